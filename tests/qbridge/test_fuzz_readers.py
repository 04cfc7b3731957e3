"""The checkpoint readers fuzzed (hypothesis): corrupted safetensors headers, offsets, dtypes and shapes,
index files, bitsandbytes quant-state documents and configs. Every outcome is a result or a typed error
(CheckpointError / FormatError / MatchError) naming a file; never another exception, a hang, or a result
that disagrees with what the files say."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct
import tempfile

import numpy as np
import pytest
import torch

import jax_side
import qbridge
from qbridge import CheckpointError, FormatError

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("safetensors.torch")
F = pytest.importorskip("bitsandbytes.functional")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

TYPED = (CheckpointError, FormatError, jax_side.MatchError)
SETTINGS = settings(
    max_examples=60, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
DTYPE_NAMES = [
    "F32",
    "F16",
    "BF16",
    "U8",
    "I8",
    "I64",
    "F8_E4M3",
    "F8_E8M0",
    "BOOL",
    "F4",
    "Q8",
    "",
    "f32",
    "F64",
]


def _write_safetensors(path: pathlib.Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _header_of(path: pathlib.Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    """A bitsandbytes NF4 checkpoint with transformers' key layout, quantized by bitsandbytes itself."""
    root = tmp_path_factory.mktemp("fuzz")
    w = torch.randn(24, 80)
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    state = {
        "layer.weight": packed,
        **{f"layer.weight.{k}": v for k, v in qs.as_dict(packed=True).items()},
        "norm.weight": torch.ones(80),
    }
    st.save_file(state, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    return root


def _outcome(path: pathlib.Path):
    """Load, and return the result or the typed error; anything else fails the test."""
    try:
        return qbridge.load_checkpoint(path, progress=False, device="cpu")
    except TYPED as e:
        assert str(path) in str(e) or "checkpoint" in str(e), f"an error that names no file: {e}"
        return e


def _copy(src: pathlib.Path) -> pathlib.Path:
    dst = pathlib.Path(tempfile.mkdtemp(prefix="qbridge-fuzz-"))
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


@SETTINGS
@given(start=s.integers(0, 400), junk=s.binary(min_size=1, max_size=40))
def test_corrupted_header_bytes(nf4_dir, start, junk):
    path = _copy(nf4_dir)
    f = path / "model.safetensors"
    blob = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    at = 8 + start % n
    blob[at : at + len(junk)] = junk[: max(0, 8 + n - at)]
    f.write_bytes(bytes(blob))
    _outcome(path)
    shutil.rmtree(path)


@SETTINGS
@given(
    key=s.sampled_from(
        ["layer.weight", "layer.weight.absmax", "norm.weight", "layer.weight.quant_state.bitsandbytes__nf4"]
    ),
    dtype=s.sampled_from(DTYPE_NAMES) | s.none(),
    shape=s.lists(s.integers(-3, 1 << 40), max_size=4) | s.none(),
    offsets=s.tuples(s.integers(-8, 1 << 41), s.integers(-8, 1 << 41)) | s.none(),
)
def test_corrupted_header_fields(nf4_dir, key, dtype, shape, offsets):
    path = _copy(nf4_dir)
    header, data = _header_of(path / "model.safetensors")
    entry = header[key]
    if dtype is not None:
        entry["dtype"] = dtype
    if shape is not None:
        entry["shape"] = shape
    if offsets is not None:
        entry["data_offsets"] = list(offsets)
    _write_safetensors(path / "model.safetensors", header, data)
    result = _outcome(path)
    if not isinstance(result, Exception) and key == "norm.weight":  # it loaded: it holds what the file says
        got = np.asarray(result["params"]["norm"]["scale"])
        assert got.size == int(np.prod(entry["shape"]))
    shutil.rmtree(path)


@SETTINGS
@given(
    field=s.sampled_from(["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_offset", "nested_dtype"]),
    value=s.one_of(s.none(), s.booleans(), s.integers(-(1 << 40), 1 << 40), s.floats(allow_nan=True), s.text(max_size=8),
                   s.lists(s.integers(-2, 1 << 33), max_size=3), s.dictionaries(s.text(max_size=3), s.integers(), max_size=2)),
)  # fmt: skip
def test_corrupted_quant_state(nf4_dir, field, value):
    path = _copy(nf4_dir)
    state = st.load_file(path / "model.safetensors")
    key = "layer.weight.quant_state.bitsandbytes__nf4"
    doc = json.loads(bytes(state[key].tolist()))
    doc[field] = value
    state[key] = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)
    st.save_file(state, path / "model.safetensors")
    result = _outcome(path)
    if not isinstance(result, Exception):  # accepted: the decode must be the one bitsandbytes gives for it
        kernel = np.asarray(result["params"]["layer"]["kernel"])
        assert kernel.size == int(np.prod(doc["shape"]))
    shutil.rmtree(path)


@SETTINGS
@given(names=s.lists(s.one_of(s.just("model-1.safetensors"), s.just("../x.safetensors"), s.just("/etc/hosts"),
                               s.text(max_size=12), s.integers(), s.none()), min_size=1, max_size=3),
       wrap=s.booleans())  # fmt: skip
def test_corrupted_index(nf4_dir, names, wrap):
    path = _copy(nf4_dir)
    (path / "model.safetensors").rename(path / "model-1.safetensors")
    keys = ["layer.weight", "norm.weight", "layer.weight.absmax"]
    weight_map = {k: names[i % len(names)] for i, k in enumerate(keys)}
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map} if wrap else weight_map)
    )
    _outcome(path)
    shutil.rmtree(path)


@SETTINGS
@given(config=s.recursive(s.one_of(s.none(), s.booleans(), s.integers(), s.text(max_size=6)),
                          lambda inner: s.lists(inner, max_size=3) | s.dictionaries(
                              s.sampled_from(["quantization_config", "quant_method", "weight_block_size", "architectures",
                                              "tie_word_embeddings", "model_type", "torch_dtype"]), inner, max_size=4),
                          max_leaves=8))  # fmt: skip
def test_corrupted_config(nf4_dir, config):
    path = _copy(nf4_dir)
    (path / "config.json").write_text(json.dumps(config))
    _outcome(path)
    shutil.rmtree(path)
