"""A safetensors file's byte ranges, worked out from safetensors' offset order and each tensor's size, are
the header's own ``data_offsets``: for files written by safetensors (mixed dtypes, empty and odd shapes) and
for headers listing tensors in any order, and, where an index leaves some of a file's tensors out, read from
the header instead. Reads through the ranges give the stored bytes."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

import qbridge

st = pytest.importorskip("safetensors.torch")

# float8 tensors are left out: they would need scales
DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.uint8,
    torch.int8,
    torch.int64,
    torch.float64,
    torch.bool,
]


NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8"}


def _header_ranges(path):
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: (8 + size + v["data_offsets"][0], 8 + size + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}  # fmt: skip


def _random_tensors(rng, n):
    out = {}
    for i in range(n):
        dtype = rng.choice(DTYPES)
        shape = tuple(rng.choice([0, 1, 3, 7, 16, 33]) for _ in range(rng.randint(0, 3)))
        t = torch.randn(shape).mul(8).to(dtype) if dtype != torch.bool else torch.randn(shape) > 0
        out[f"m.{rng.randint(0, 999)}.t{i}"] = t
    return out


@pytest.mark.parametrize("seed", range(4))
def test_ranges_from_the_offset_order_are_the_headers(tmp_path, seed):
    rng = random.Random(seed)
    tensors = _random_tensors(rng, 60)
    st.save_file(tensors, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        path = ckpt.source.key_file[next(iter(tensors))]
        assert ckpt.source._offsets(path) == _header_ranges(path)
        for key, t in tensors.items():
            got = ckpt.read(key)
            assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape)
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), key


def test_a_header_in_any_order(tmp_path):
    """Another writer's header: entries in reverse name order, data in a shuffled order."""
    rng = random.Random(7)
    tensors = {f"w{i:02d}": torch.randn(rng.randint(0, 9), 5).to(rng.choice(DTYPES[:4])) for i in range(30)}
    order = list(tensors)
    rng.shuffle(order)
    header, at, data = {}, 0, b""
    for key in order:
        raw = tensors[key].contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": NAMES[tensors[key].dtype], "shape": list(tensors[key].shape),
                       "data_offsets": [at, at + len(raw)]}  # fmt: skip
        at += len(raw)
        data += raw
    text = json.dumps(dict(sorted(header.items(), reverse=True))).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data)
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        path = ckpt.source.key_file["w00"]
        assert ckpt.source._offsets(path) == _header_ranges(path)
        for key, t in tensors.items():
            assert torch.equal(ckpt.read(key).view(torch.uint8), t.view(torch.uint8)), key


def test_a_file_holding_a_tensor_the_index_lists_elsewhere_reads_its_header(tmp_path):
    """Two files of an index both hold ``shared`` (same bits), listed in the first: the second file's copy is
    not added, so its ranges come from its header; every listed tensor reads right from its own file."""
    rng = random.Random(3)
    a, b = _random_tensors(rng, 20), _random_tensors(rng, 20)
    shared = torch.randn(5, 3)
    a["shared"], b["shared"] = shared, shared.clone()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    st.save_file(a, tmp_path / names[0])
    st.save_file(b, tmp_path / names[1])
    weight_map = {**dict.fromkeys(a, names[0]), **{k: names[1] for k in b if k != "shared"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        # the first file, all of whose tensors the index lists there, got its ranges at opening, from the sizes
        # safetensors gave in offset order; the second's copy of shared is not added: its header says
        assert set(ckpt.source._ranges_as_opened) == {tmp_path / names[0]}
        for name in names:
            assert ckpt.source._offsets(tmp_path / name) == _header_ranges(tmp_path / name)
        assert not ckpt.source._ranges_as_opened  # taken at each file's first read
        for key, t in {**b, **a}.items():
            assert ckpt.source.key_file[key] == tmp_path / weight_map[key]
            assert torch.equal(
                ckpt.read(key).reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
            ), key


def test_a_file_rewritten_in_place_since_it_was_opened_is_refused(tmp_path):
    """A file saved again in place (same inode, another header) after opening: its tensors may lie elsewhere
    now, so a read names the file and says to open the checkpoint again, instead of reading other bytes."""
    a, b = torch.arange(6, dtype=torch.int64), torch.arange(200, 206, dtype=torch.int64)
    st.save_file({"a": a, "b": b}, tmp_path / "model.safetensors")
    other = tmp_path / "other.safetensors"
    st.save_file({"a": a, "aa": torch.full((4,), -1), "b": b}, other)
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        with open(tmp_path / "model.safetensors", "r+b") as f:  # the same file, rewritten
            f.write(other.read_bytes())
        with pytest.raises(
            qbridge.CheckpointError, match=r"model\.safetensors: the file changed on disk since"
        ):
            ckpt.read("b")


def test_a_read_that_comes_up_short_on_a_rewritten_file_says_it_was_rewritten(tmp_path):
    """After a file's first read its byte ranges are known; a rewrite in place that leaves a tensor's bytes
    short (another, shorter file) is named as a rewrite, not as a file cut short."""
    a, big = torch.arange(6, dtype=torch.int64), torch.arange(4096, dtype=torch.int64)
    st.save_file({"a": a, "big": big}, tmp_path / "model.safetensors")
    other = tmp_path / "other.safetensors"
    st.save_file({"a": a, "aa": a.clone(), "big": big[:8].clone()}, other)  # another header size, shorter
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.read("a"), a)  # the file's byte ranges are known from here on
        with open(tmp_path / "model.safetensors", "r+b") as f:  # rewritten in place, and shorter
            f.write(other.read_bytes())
            f.truncate()
        for read in (ckpt.read, lambda key: ckpt.read_stacked([key])):
            with pytest.raises(
                qbridge.CheckpointError, match=r"model\.safetensors: the file changed on disk"
            ):
                read("big")


def test_slices_and_windows_of_a_shorter_rewrite_say_it_was_rewritten(tmp_path):
    a, big = torch.arange(6, dtype=torch.int64), torch.arange(4096, dtype=torch.int64)
    st.save_file({"a": a, "big": big}, tmp_path / "model.safetensors")
    other = tmp_path / "other.safetensors"
    st.save_file({"a": a, "aa": a.clone(), "big": big[:8].clone()}, other)
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.read("a"), a)
        with open(tmp_path / "model.safetensors", "r+b") as f:
            f.write(other.read_bytes())
            f.truncate()
        for read in (
            lambda: ckpt.read_slice("big", (slice(0, 4096),)),
            lambda: ckpt.read_window("big", 8, (0, 4096), (0, 8)),
        ):
            with pytest.raises(
                qbridge.CheckpointError, match=r"model\.safetensors: the file changed on disk"
            ):
                read()


def test_a_failed_stacked_read_counts_nothing(tmp_path):
    st.save_file({"a": torch.zeros(64, 1024), "b": torch.ones(64, 1024)}, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        begin = ckpt.source._offsets(tmp_path / "model.safetensors")["b"][0]
        os.truncate(tmp_path / "model.safetensors", begin + 100)
        with pytest.raises(qbridge.CheckpointError, match="reading 'b' failed"):
            ckpt.read_stacked(["a", "b"])
        assert ckpt.bytes_read == 0  # nothing handed out
        assert torch.equal(ckpt.read("a"), torch.zeros(64, 1024)) and ckpt.bytes_read == 64 * 1024 * 4


def test_a_header_read_again_without_the_key_is_a_checkpoint_error(tmp_path):
    """A file whose ranges come from its header (it holds a tensor the index lists in another file), rewritten
    in place with the same header size but a tensor renamed: every read names the file and the key."""
    s1, s2 = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    a, c = torch.zeros(64, 64), torch.ones(64, 64)
    st.save_file({"a": a}, s1)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": s1.name, "c": s2.name}})
    )
    renamed = tmp_path / "renamed.bin"
    st.save_file({"a": a, "e": c}, renamed)  # 'c' renamed 'e': the same header size
    reads = {
        "read": lambda ckpt: ckpt.read("c"),
        "read_stacked": lambda ckpt: ckpt.read_stacked(["c"]),
        "read_window": lambda ckpt: ckpt.read_window("c", 256, (0, 1), (0, 4)),
        "map_tensor": lambda ckpt: ckpt.source.map_tensor("c"),
    }
    for read in reads.values():
        st.save_file({"a": a, "c": c}, s2)
        with qbridge.open_checkpoint(tmp_path) as ckpt:
            with open(s2, "r+b") as f:
                f.write(renamed.read_bytes())
            with pytest.raises(
                qbridge.CheckpointError, match=r"model-00002-of-00002\.safetensors: reading 'c'"
            ):
                read(ckpt)


def test_a_torchao_weight_without_qdata_takes_its_shape_from_its_first_piece_by_name(tmp_path):
    """A file's tensors are added in the order of their offsets; a torchao weight described without a
    ``qdata`` piece takes its shape from its first piece by name (``packed``), whatever order the file
    stores its pieces in."""
    doc = {"_type": "Int4SomethingTensor", "_data": {}, "_tensor_data_names": ["packed", "scale"]}
    meta = {"tensor_names": json.dumps(["lin.weight"]), "lin.weight": json.dumps(doc)}
    # bfloat16 before uint8 in the file (safetensors stores wider dtypes first): offset order is scale, packed
    st.save_file(
        {"lin._weight_packed": torch.zeros(4, 8, dtype=torch.uint8),
         "lin._weight_scale": torch.ones(4, 1, dtype=torch.bfloat16)},
        tmp_path / "model.safetensors", metadata=meta,
    )  # fmt: skip
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        assert list(ckpt.source.shapes) == ["lin._weight_scale", "lin._weight_packed"]  # as added
        entry = ckpt.entries["lin.weight"]
        assert entry.shape == (4, 8)
        assert list(entry.keys) == sorted(entry.keys)
