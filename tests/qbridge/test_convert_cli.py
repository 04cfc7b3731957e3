"""inspect_checkpoint, convert_checkpoint (Orbax, atomic), the CLI and the parity module."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoints import bnb_llama, dense_llama, fp8_llama
from helpers import assert_same_leaves

import jax_side
import qbridge
from qbridge import parity
from qbridge._cli import main

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def nf4(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    dense_llama(root / "dense")
    bnb_llama(root / "dense", root / "nf4", quant_type="nf4", nested=True)
    return root / "nf4"


def test_inspect(nf4):
    s = qbridge.inspect_checkpoint(nf4)
    assert (
        s.format == "bitsandbytes-4bit"
        and s.kinds["bnb4"]["tensors"] == 14
        and s.kinds["dense"]["tensors"] == 7
    )
    assert (
        s.kinds["bnb4"]["dense_bytes"] > 2 * s.kinds["bnb4"]["stored_bytes"]
    )  # tiny weights: tables weigh in
    assert s.quantization_config["quant_method"] == "bitsandbytes"
    text = str(s)
    assert "bnb4" in text and "bnb_4bit_quant_type=nf4" in text


def test_convert_round_trip(nf4, tmp_path):
    out = tmp_path / "orbax"
    report = qbridge.convert_checkpoint(nf4, out, progress=False)
    assert report.leaves == 21 and out.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["orbax"]  # no partial or temporary files left
    restored = qbridge.restore_converted(out)
    loaded = qbridge.load_checkpoint(nf4, progress=False)
    assert_same_leaves(restored, loaded)


def test_kept_quantized_weights_come_back_as_weights_without_a_target(nf4, tmp_path):
    """Orbax stores arrays only: the weights' other fields travel beside them, so the pieces restored
    without a target are NF4Weights again, equal bit for bit."""
    out = tmp_path / "kept.orbax"
    qbridge.convert_checkpoint(nf4, out, keep_quantized=True, progress=False)
    restored = qbridge.restore_converted(out)
    loaded = qbridge.load_checkpoint(nf4, keep_quantized=True, progress=False)
    a = jax.tree_util.tree_flatten_with_path(loaded, is_leaf=jax_side.is_quantized)[0]
    b = dict(jax.tree_util.tree_flatten_with_path(restored, is_leaf=jax_side.is_quantized)[0])
    kept = [path for path, leaf in a if jax_side.is_quantized(leaf)]
    assert len(kept) == 14 and b.keys() == dict(a).keys()
    for path, leaf in a:
        other = b[path]
        assert type(other) is type(leaf)
        x, y = (w.dequantize() if jax_side.is_quantized(w) else w for w in (leaf, other))
        assert x.dtype == y.dtype and np.array_equal(
            np.asarray(x).view(np.uint16), np.asarray(y).view(np.uint16)
        )
    # into float32 the weights keep their rounding to the checkpoint's bfloat16 (decode_dtype) through the file;
    # a record written before that field existed still restores (rounded to dtype alone)
    out32 = tmp_path / "kept32.orbax"
    qbridge.convert_checkpoint(nf4, out32, keep_quantized=True, dtype=jnp.float32, progress=False)
    record = json.loads((out32 / "qbridge_quantized.json").read_text())
    assert {w["fields"]["decode_dtype"] for w in record["weights"]} == {"bfloat16"}
    # without one (a bfloat16 model) the record is as before the field existed: older versions read it
    assert not any(
        "decode_dtype" in w["fields"]
        for w in json.loads((out / "qbridge_quantized.json").read_text())["weights"]
    )
    loaded32 = qbridge.load_checkpoint(nf4, keep_quantized=True, dtype=jnp.float32, progress=False)
    w32 = loaded32["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    r32 = qbridge.restore_converted(out32)["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert (r32.dtype, r32.decode_dtype) == ("float32", "bfloat16")
    assert np.array_equal(np.asarray(r32.dequantize()), np.asarray(w32.dequantize()))
    assert np.array_equal(
        np.asarray(r32.dequantize()), np.asarray(w32.dequantize(dtype=jnp.bfloat16), np.float32)
    )
    for w in record["weights"]:
        del w["fields"]["decode_dtype"]
    (out32 / "qbridge_quantized.json").write_text(json.dumps(record))
    old = qbridge.restore_converted(out32)["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert (old.dtype, old.decode_dtype) == ("float32", None)
    record["weights"][3]["fields"]["decode_dtype"] = "float64"  # refused when read, naming the weight
    (out32 / "qbridge_quantized.json").write_text(json.dumps(record))
    where = "/".join(map(str, record["weights"][3]["path"]))
    with pytest.raises(
        qbridge.CheckpointError, match=f"does not fit the checkpoint at {where} .*decode_dtype='float64'"
    ):
        qbridge.restore_converted(out32)
    (out32 / "qbridge_quantized.json").write_text(json.dumps({**record, "format": 2}))
    with pytest.raises(qbridge.CheckpointError, match="format 2, written by a newer qbridge"):
        qbridge.restore_converted(out32)
    for version in (0, "1", True):
        (out32 / "qbridge_quantized.json").write_text(json.dumps({**record, "format": version}))
        with pytest.raises(qbridge.CheckpointError, match=r"in format .* \(this one reads format 1\)$"):
            qbridge.restore_converted(out32)
    (out / "qbridge_quantized.json").write_text('{"format": 1, "weights": [{"path": ["params", "nowhere"]}]}')
    with pytest.raises(qbridge.CheckpointError, match="record of kept-quantized weights does not fit"):
        qbridge.restore_converted(out)


@pytest.mark.parametrize("kept", [False, True], ids=["dense", "kept"])
def test_a_converted_model_goes_back_into_the_nnx_model(nf4, tmp_path, kept):
    """Written from an nnx target (layers keyed by ints), restored without one: the layer numbers are ints
    again, so the tree goes back into the model and gives the logits of a direct load. With a target whose
    kept weights' fields differ from the file's record, the restore warns, naming the weight."""
    nnx = pytest.importorskip("flax.nnx")
    config = jax_side.LlamaConfig.from_hf(json.loads((nf4 / "config.json").read_text()))
    target = jax_side.abstract_llama(config, param_dtype=jnp.float32)
    out = tmp_path / "model.orbax"
    qbridge.convert_checkpoint(nf4, out, target=target, keep_quantized=kept, progress=False)
    restored = qbridge.restore_converted(out)
    direct = qbridge.load_checkpoint(nf4, target=target, keep_quantized=kept, progress=False)
    assert list(restored["model"]["layers"]) == [0, 1]
    ids = jnp.asarray(np.arange(9)[None] % config.vocab_size)
    logits = []
    for params in (restored, direct):
        model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.float32)
        if kept:
            jax_side.load_quantized_into_nnx(model, params)
        else:
            nnx.update(model, params)
        logits.append(np.asarray(model(ids)))
    np.testing.assert_array_equal(logits[0], logits[1])
    if kept:  # a target built without the checkpoint's dtype: its weights would skip the bfloat16 rounding
        unrounded = jax.tree_util.tree_map(
            lambda x: dataclasses.replace(x, decode_dtype=None) if jax_side.is_quantized(x) else x,
            direct, is_leaf=jax_side.is_quantized,
        )  # fmt: skip
        with pytest.warns(
            UserWarning, match=r"kept weight at model/layers/0/.* restored with the target's fields"
        ):
            qbridge.restore_converted(out, unrounded)
        bf16 = jax_side.abstract_llama(config, param_dtype=jnp.bfloat16)
        same = jax.tree_util.tree_map(  # decode_dtype equal to dtype: the same decoding, no warning
            lambda x: dataclasses.replace(x, decode_dtype=x.dtype) if jax_side.is_quantized(x) else x,
            qbridge.load_checkpoint(nf4, target=bf16, keep_quantized=True, progress=False),
            is_leaf=jax_side.is_quantized,
        )
        out16 = tmp_path / "bf16.orbax"
        qbridge.convert_checkpoint(nf4, out16, target=bf16, keep_quantized=True, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            qbridge.restore_converted(out16, same)


def test_restoring_onto_an_nnx_model_or_state(nf4, tmp_path):
    """A checkpoint written from an nnx target restores onto the model, its state or its abstract twin (each
    taken as its pure dict), giving the arrays written. Onto a tree it was not written from, or with kept
    weights onto a dense model, the error says which target fits."""
    nnx = pytest.importorskip("flax.nnx")
    config = jax_side.LlamaConfig.from_hf(json.loads((nf4 / "config.json").read_text()))
    target = jax_side.abstract_llama(config, param_dtype=jnp.float32)
    out = tmp_path / "model.orbax"
    qbridge.convert_checkpoint(nf4, out, target=target, progress=False)
    want = qbridge.restore_converted(out)
    model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.float32)
    for onto in (model, nnx.state(model), target):
        got = qbridge.restore_converted(out, onto)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    targetless = tmp_path / "targetless.orbax"
    qbridge.convert_checkpoint(nf4, targetless, progress=False)
    with pytest.raises(
        qbridge.CheckpointError, match=r"does not match the checkpoint's.*restores without one"
    ):
        qbridge.restore_converted(targetless, model)
    kept = tmp_path / "kept.orbax"
    qbridge.convert_checkpoint(nf4, kept, target=target, keep_quantized=True, progress=False)
    with pytest.raises(qbridge.CheckpointError, match=r"kept-quantized weights.*load_quantized_into_nnx"):
        qbridge.restore_converted(kept, model)
    # a model of another size: the leaves either side lacks, and the shapes that differ, are named
    layers = config.num_hidden_layers
    bigger = jax_side.abstract_llama(dataclasses.replace(config, num_hidden_layers=layers + 1))
    with pytest.raises(
        qbridge.CheckpointError, match=rf"the checkpoint has no model\.layers\.{layers}\.input_layernorm"
    ):
        qbridge.restore_converted(out, bigger)
    smaller = jax_side.abstract_llama(dataclasses.replace(config, num_hidden_layers=layers - 1))
    with pytest.raises(qbridge.CheckpointError, match=rf"the target has no model\.layers\.{layers - 1}\."):
        qbridge.restore_converted(out, smaller)
    # the same arrays in other containers (layers as a list where the checkpoint keys them by number): a guess,
    # with Orbax's own words beside it
    listed = nnx.to_pure_dict(nnx.state(target))
    listed["model"]["layers"] = [listed["model"]["layers"][i] for i in sorted(listed["model"]["layers"])]
    with pytest.raises(
        qbridge.CheckpointError,
        match=r"the same arrays by name and shape, in other containers: .* \(Orbax: \w+",
    ):
        qbridge.restore_converted(out, listed)
    wider = jax_side.abstract_llama(dataclasses.replace(config, vocab_size=config.vocab_size * 2))
    with pytest.raises(qbridge.CheckpointError, match=r"shapes differ: lm_head\.kernel \(\d+, \d+\) stored"):
        qbridge.restore_converted(out, wider)


def test_a_target_of_other_shapes_is_refused_before_any_array_is_read(nf4, tmp_path):
    """Orbax, finding a shape that differs while it reads, left its reads of the other arrays to fail later:
    over 800 lines of tracebacks on stderr ("Event loop is closed", TensorStore's "Encountered error while
    reading array index") beside the error. The shapes are compared with the checkpoint's record first: the
    error, and nothing on stderr (in a process of its own, where those tracebacks went)."""
    config = jax_side.LlamaConfig.from_hf(json.loads((nf4 / "config.json").read_text()))
    out = tmp_path / "model.orbax"
    qbridge.convert_checkpoint(
        nf4, out, target=jax_side.abstract_llama(config, param_dtype=jnp.float32), progress=False
    )
    code = (
        "import dataclasses, json, pathlib, qbridge, jax_side\n"
        f"config = jax_side.LlamaConfig.from_hf(json.loads(pathlib.Path({str(nf4 / 'config.json')!r}).read_text()))\n"
        "wider = jax_side.abstract_llama(dataclasses.replace(config, vocab_size=config.vocab_size * 2))\n"
        "try:\n"
        f"    qbridge.restore_converted({str(out)!r}, wider)\n"
        "except qbridge.CheckpointError as e:\n"
        "    print('refused:', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"refused: .*shapes differ: lm_head\.kernel \(\d+, \d+\) stored", done.stdout), (
        done.stdout
    )
    assert "Traceback" not in done.stderr and "Encountered error" not in done.stderr, done.stderr[-3000:]


def test_the_shapes_compared_first_are_those_orbax_reads(nf4, tmp_path):
    """The comparison made before reading skips what Orbax skips and records what Orbax records: a None in the
    target leaves that array unread (the rest restore), and a typed PRNG key is recorded by its key data's
    shape ((2,) for threefry, where the key's own shape is ())."""
    import orbax.checkpoint as ocp

    out = tmp_path / "dense.orbax"
    qbridge.convert_checkpoint(nf4, out, progress=False)
    want = qbridge.restore_converted(out)
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
    target["params"]["lm_head"]["kernel"] = None
    got = qbridge.restore_converted(out, target)
    assert got["params"]["lm_head"]["kernel"] is None
    del want["params"]["lm_head"]["kernel"], got["params"]["lm_head"]["kernel"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    keyed = tmp_path / "keyed.orbax"
    with ocp.StandardCheckpointer() as c:
        c.save(keyed, {"rng": jax.random.key(3), "w": jnp.arange(2.0)})
    for onto in ({"rng": jax.random.key(1), "w": jnp.zeros(2)},
                 {"rng": jax.eval_shape(lambda: jax.random.key(1)), "w": jax.ShapeDtypeStruct((2,), jnp.float32)}):  # fmt: skip
        got = qbridge.restore_converted(keyed, onto)
        np.testing.assert_array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(jax.random.key(3)))
        np.testing.assert_array_equal(got["w"], [0.0, 1.0])
    with pytest.raises(
        qbridge.CheckpointError, match=r"shapes differ: w \(2,\) stored, \(3,\) in the target"
    ):
        qbridge.restore_converted(keyed, {"rng": jax.random.key(1), "w": jnp.zeros(3)})


def test_convert_refuses_to_clobber_and_overwrites_on_request(nf4, tmp_path):
    out = tmp_path / "orbax"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        qbridge.convert_checkpoint(nf4, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(
        FileExistsError, match="is no Orbax checkpoint"
    ):  # overwrite replaces only a checkpoint
        qbridge.convert_checkpoint(nf4, out, progress=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    qbridge.convert_checkpoint(nf4, out, progress=False)
    first = (out / "_CHECKPOINT_METADATA").stat().st_mtime_ns
    qbridge.convert_checkpoint(nf4, out, progress=False, overwrite=True)
    assert (out / "_CHECKPOINT_METADATA").stat().st_mtime_ns != first


def test_convert_never_writes_over_its_source(nf4, tmp_path):
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(nf4, parent / "ck")
    (parent / "notes.txt").write_text("mine")
    for out in (parent, parent / "ck"):
        with pytest.raises(FileExistsError, match="holds the checkpoint being converted"):
            qbridge.convert_checkpoint(parent / "ck", out, progress=False, overwrite=True)
    assert (parent / "notes.txt").exists() and (parent / "ck" / "config.json").exists()


def test_convert_output_paths_that_cannot_be_and_an_orbax_checkpoint_given_to_load(nf4, tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(qbridge.CheckpointError, match="afile: a file, not a directory"):
        qbridge.convert_checkpoint(nf4, tmp_path / "afile" / "x.orbax", progress=False)
    with pytest.raises(ValueError, match="out is empty"):
        qbridge.convert_checkpoint(nf4, "", progress=False)
    qbridge.convert_checkpoint(nf4, tmp_path / "m.orbax", progress=False)
    with pytest.raises(
        qbridge.CheckpointError, match=r"an Orbax checkpoint, not a PyTorch one; .*restore_converted"
    ):
        qbridge.load_checkpoint(tmp_path / "m.orbax", progress=False)


def test_failed_conversion_leaves_nothing(nf4, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in nf4.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(qbridge.CheckpointError):
        qbridge.convert_checkpoint(broken, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_failure_while_writing_leaves_nothing(nf4, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def explode(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", explode)
    with pytest.raises(OSError, match="disk full"):
        qbridge.convert_checkpoint(nf4, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_conversions_partial_files_are_removed_by_the_next(nf4, tmp_path):
    """A conversion killed after Orbax wrote its arrays (SIGKILL: no cleanup runs) leaves a hidden partial
    directory; the next conversion to the same place removes it (they had piled up, each model-sized). Those of
    another machine, process-id namespace (a container sharing the host name and volume) or boot, or of an
    owner record without them, are kept and named in a warning (a live conversion in such a container had been
    deleted); one of a process that runs is kept in silence."""
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "out.orbax"
    child = (
        "import os, signal, sys, qbridge, qbridge._convert as c\n"
        "c._write_quantized_fields = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "qbridge.convert_checkpoint(sys.argv[1], sys.argv[2], progress=False)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    killed = subprocess.run([sys.executable, "-c", child, str(nf4), str(out)], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.orbax.partial-")]
    assert (left / "state").is_dir()  # Orbax's arrays: what had been left behind
    owner = json.loads((left / "qbridge-owner.json").read_text())
    assert owner["pid"] != os.getpid() and owner["host"] == socket.gethostname()
    # the same host name in another process-id namespace (a container sharing the volume): its pid means
    # nothing here, so a live conversion there must not be taken for dead
    elsewhere = {
        ".out.orbax.partial-0000000100000001": dict(owner, host=owner["host"] + "-other"),
        ".out.orbax.partial-0000000300000003": dict(owner, pid_namespace=(owner["pid_namespace"] or 0) + 1),
        ".out.orbax.partial-0000000400000004": dict(owner, boot="another boot"),
        ".out.orbax.partial-0000000500000005": {"host": owner["host"], "pid": owner["pid"]},  # older qbridge
    }
    for name, who in elsewhere.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "qbridge-owner.json").write_text(json.dumps(who))
    running = tmp_path / ".out.orbax.partial-0000000200000002"
    running.mkdir()
    (running / "qbridge-owner.json").write_text(json.dumps(dict(owner, pid=os.getpid())))
    with pytest.warns(
        UserWarning,
        match=r"partial-0000000100000001, \S+partial-0000000300000003, \S+partial-0000000400000004 \(and 1 more\): partial "
        r"files of a conversion to out\.orbax by another machine, container or boot",
    ):
        qbridge.convert_checkpoint(nf4, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.orbax", *elsewhere, running.name])
    assert jax.tree.structure(qbridge.restore_converted(out)) == jax.tree.structure(
        qbridge.load_checkpoint(nf4, progress=False)
    )


def test_an_overwrite_killed_between_its_renames_leaves_the_old_checkpoint_named(nf4, tmp_path):
    """An overwrite renames the old ``out`` aside, moves the new one in, then removes the old. Killed before
    removing it, the next conversion removes the old copy (model-sized, hidden, it had stayed); killed between
    the renames, the old copy is the only checkpoint left: the next conversion renames it back, as the
    overwrite had not happened, and says so."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out.orbax"
    qbridge.convert_checkpoint(nf4, out, progress=False)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for kill_at in ("removing the old", "between the renames"):
        child = (
            "import os, signal, sys, qbridge, qbridge._convert as c\n"
            "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
            + (
                "c.shutil = type('S', (), {'rmtree': staticmethod(die)})\n"
                if kill_at == "removing the old"
                else "real = os.replace\n"  # the rename of the new checkpoint into place
                "os.replace = lambda a, b: die() if 'partial' in str(a) and str(b) == sys.argv[2] else real(a, b)\n"
            )
            + "qbridge.convert_checkpoint(sys.argv[1], sys.argv[2], overwrite=True, progress=False)\n"
        )
        killed = subprocess.run(
            [sys.executable, "-c", child, str(nf4), str(out)], env=env, capture_output=True
        )
        assert killed.returncode == -9, killed.stderr[-2000:]
        (retired,) = tmp_path.glob(
            ".out.orbax.replaced-*" if kill_at != "removing the old" else ".out.orbax.removing-*"
        )
        if kill_at == "removing the old":  # superseded, never to be restored, half removed or not
            assert out.is_dir()
            qbridge.convert_checkpoint(nf4, tmp_path / "out.orbax", overwrite=True, progress=False)
            assert not retired.exists()
        else:  # the overwrite did not happen: out is what it was, and is there again
            assert not out.exists()
            with (
                pytest.warns(
                    UserWarning, match=rf"out.orbax: restored from {re.escape(retired.name)}, where an"
                ),
                pytest.raises(FileExistsError, match=r"out\.orbax exists; pass overwrite=True"),
            ):
                qbridge.convert_checkpoint(nf4, out, progress=False)
            assert out.is_dir() and not retired.exists()
            qbridge.convert_checkpoint(nf4, out, overwrite=True, progress=False)
        for partial in tmp_path.glob(".out.orbax.partial-*"):  # what the killed conversion left: removed too
            raise AssertionError(f"{partial} left")
    # an overwrite that runs, between its renames (its partial directory's owner runs): its old out is its own
    os.replace(out, tmp_path / ".out.orbax.replaced-00000001")
    (tmp_path / ".out.orbax.partial-00000001").mkdir()
    owner = dict(qbridge._convert._owner(), pid=os.getpid())
    (tmp_path / ".out.orbax.partial-00000001" / "qbridge-owner.json").write_text(json.dumps(owner))
    qbridge.convert_checkpoint(nf4, out, progress=False)  # out was missing: written, the other's left alone
    assert (tmp_path / ".out.orbax.replaced-00000001").is_dir()
    assert jax.tree.structure(qbridge.restore_converted(out)) == jax.tree.structure(
        qbridge.load_checkpoint(nf4, progress=False)
    )


def test_cli_inspect_convert_and_errors(nf4, tmp_path, capsys):
    assert main(["inspect", str(nf4)]) == 0
    assert "bitsandbytes-4bit" in capsys.readouterr().out
    assert main(["convert", str(nf4), str(tmp_path / "o"), "--quiet", "--dtype", "float32"]) == 0
    restored = qbridge.restore_converted(tmp_path / "o")
    assert restored["params"]["model"]["norm"]["scale"].dtype == jnp.float32
    assert main(["convert", str(nf4), str(tmp_path / "o"), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
    assert (
        main(["convert", str(nf4), str(tmp_path / "k"), "--quiet", "--keep-quantized", "--dtype", "float32"])
        == 0
    )
    kept = qbridge.restore_converted(tmp_path / "k")["params"]["model"]["layers"]["0"]["mlp"]["up_proj"][
        "kernel"
    ]
    assert isinstance(kept, jax_side.NF4Weight) and (kept.dtype, kept.decode_dtype) == ("float32", "bfloat16")
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    other = tmp_path / "other-config"  # a config.json of other sizes: summarized, listed, exit status 1
    shutil.copytree(nf4, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]})
    )
    assert main(["inspect", str(other)]) == 1
    out = capsys.readouterr().out
    assert "bitsandbytes-4bit" in out and "does not fit the model of its config.json" in out
    assert "other size: model.layers.0.mlp.up_proj.weight" in out


def test_parity_module():
    ref = torch.randn(4, 8, dtype=torch.float32)
    good = ref.numpy() + 1e-7
    report = parity.assert_parity(ref, good)
    assert report.ok and report.outputs[0].dtype == "float32"
    with pytest.raises(AssertionError, match="FAIL"):
        parity.assert_parity(ref, ref.numpy() * 1.01)
    bf = ref.to(torch.bfloat16)
    assert parity.compare(bf, jnp.asarray(ref.numpy()).astype(jnp.bfloat16)).outputs[0].dtype == "bfloat16"
    nan = ref.numpy().copy()
    nan[0, 0] = np.nan
    assert not parity.compare(ref, nan).ok
    tree = parity.compare({"a": ref, "b": [ref, ref]}, {"a": good, "b": [good, good]})
    assert [o.name for o in tree.outputs] == ["a", "b[0]", "b[1]"]
    with pytest.raises(ValueError, match="shapes"):
        parity.compare(ref, good[:2])
    run = parity.run_parity(lambda x: x * 2, lambda x: jnp.asarray(x) * 2, [np.ones((3, 3), np.float32)])
    assert run.ok and run.outputs[0].max_abs == 0


def test_fp8_inspect_care_lines(tmp_path):
    dense_llama(tmp_path / "dense")
    fp8_llama(tmp_path / "dense", tmp_path / "fp8")
    s = qbridge.inspect_checkpoint(tmp_path / "fp8")
    assert any("gate_proj" in c and "[2, 1]" in c for c in s.care)


def test_demo_command(capsys, tmp_path):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "equal to bitsandbytes' own dequantization: 28 of 28" in out
    assert "logits" in out and " ok" in out
    assert f"checkpoints kept: {tmp_path / 'llama-nf4'} (NF4)" in out
    # without a workdir the summary's path is gone when the demo ends: it says so, and how to keep them
    from qbridge._demo import DemoResult, format_demo

    text = format_demo(DemoResult("/tmp/x/llama-nf4", "/tmp/x/llama-nf4: ...", "", 28, 28, {}, "cpu"))
    assert text.endswith("the checkpoints were in a temporary folder, removed: --workdir DIR keeps them")
    # what it left is recognized as its own, and its files replaced (no stale shard of the earlier checkpoint)
    from qbridge._demo import _clear, _made_by_demo

    folders = [tmp_path / "llama-bf16", tmp_path / "llama-nf4"]
    assert all(_made_by_demo(f) for f in folders)
    (folders[1] / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    _clear(folders, overwrite=False)
    assert all(f.is_dir() and not any(f.iterdir()) for f in folders)
    # a checkpoint of the demo's model that the demo did not write (the user's own quantization of it: the
    # same config, no mark) is not its own: refused without overwrite, nothing removed (it was deleted)
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    capsys.readouterr()
    (folders[1] / "qbridge-demo.json").unlink()
    kept = sorted(p.name for p in folders[1].iterdir())
    assert not _made_by_demo(folders[1])
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "llama-nf4 holds a checkpoint an earlier demo did not write" in capsys.readouterr().err
    assert sorted(p.name for p in folders[1].iterdir()) == kept


def _leaves(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.mark.parametrize("spec", ["llama", "checkpoints:flax_llama_target"])
def test_convert_takes_a_target_named_on_the_command_line(nf4, tmp_path, spec, capsys):
    out = tmp_path / "flax.orbax"
    assert main(["convert", str(nf4), str(out), "--target", spec, "--quiet"]) == 0
    restored = _leaves(qbridge.restore_converted(out))
    want = _leaves(qbridge.load_checkpoint(nf4, target=qbridge.build_target(spec, nf4), progress=False))
    assert restored.keys() == want.keys() and "model/layers/0/mlp/down_proj/kernel" in restored
    for key, leaf in want.items():
        assert restored[key].dtype == leaf.dtype and np.array_equal(
            np.asarray(restored[key]).view(np.uint8), np.asarray(leaf).view(np.uint8)
        )
    assert restored["model/norm/scale"].dtype == jnp.bfloat16  # the built-in Llama in the checkpoint's dtype
    f32 = qbridge.build_target("llama", nf4, param_dtype=jnp.float32)
    assert (
        qbridge.load_checkpoint(nf4, target=f32, progress=False)["model"]["norm"]["scale"].dtype
        == jnp.float32
    )


def test_convert_passes_kinds_rename_and_strict_through(nf4, tmp_path, capsys):
    out = tmp_path / "o"
    assert (
        main(["convert", str(nf4), str(out), "--target", "llama", "--rename", r"^model\.=", "--quiet"]) == 2
    )
    assert "missing: target leaf 'model.norm.scale'" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(
        jax_side.MatchError, match="strict=False, but"
    ):  # shapes only where nothing fills them
        qbridge.convert_checkpoint(
            nf4,
            out,
            target=qbridge.build_target("llama", nf4),
            rename={r"^model\.": ""},
            strict=False,
            progress=False,
        )
    assert main(["convert", str(nf4), str(out), "--kind", "bad=PAIR=x", "--kind", "nokind", "--quiet"]) == 2
    assert "--kind takes PATTERN=VALUE, got 'nokind'" in capsys.readouterr().err
    assert main(["convert", str(nf4), str(out), "--rename", "(=x", "--quiet"]) == 2
    assert "--rename '(=x': no '=' in it follows a valid regular expression" in capsys.readouterr().err
    from qbridge._cli import _pairs  # a pattern may hold "=" itself: the split is after the valid regex

    assert _pairs([r"^model\.(?=layers)=", "a=b=c"], "--rename") == {r"^model\.(?=layers)": "", "a": "b=c"}
    assert main(["convert", str(nf4), str(out), "--target", "no.such.module:Thing", "--quiet"]) == 2
    assert main(["convert", str(nf4), str(out), "--kind", r"embed_tokens=linear", "--quiet"]) == 0
    assert "kernel" in qbridge.restore_converted(out)["params"]["model"]["embed_tokens"]


def test_a_damaged_orbax_checkpoint_names_the_array(nf4, tmp_path):
    """A data file cut short or removed: TensorStore's bare Exception (with its spec dumped) became a
    CheckpointError naming the array, with or without a target."""
    import os
    import shutil

    out = tmp_path / "orbax"
    qbridge.convert_checkpoint(nf4, out, progress=False)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                      qbridge.restore_converted(out))  # fmt: skip
    for case in ("cut", "removed"):
        damaged = tmp_path / case
        shutil.copytree(out, damaged)
        data = max((f for f in damaged.rglob("*") if f.is_file() and "d" in f.relative_to(damaged).parts[:-1]),
                   key=lambda f: f.stat().st_size)  # fmt: skip
        if case == "cut":
            os.truncate(data, data.stat().st_size // 2)
        else:
            data.unlink()
        for target in (None, abstract):
            with pytest.raises(
                qbridge.CheckpointError, match=r"damaged: reading the array 'params\.[\w.]+' failed"
            ):
                qbridge.restore_converted(damaged, target)


def test_a_checkpoint_written_from_other_devices_asks_for_a_target(nf4, tmp_path):
    """Written from 4 devices (another process), restored without a target in this one: Orbax's topology
    mismatch said the checkpoint was damaged and to convert it again; it asks for a target, with which it
    restores."""
    import os
    import subprocess
    import sys

    out = tmp_path / "four.orbax"
    code = (
        "import jax, numpy as np, qbridge\n"
        "from jax.sharding import Mesh, PartitionSpec as P\n"
        "mesh = Mesh(np.array(jax.devices()).reshape(4), ('x',))\n"
        f"qbridge.convert_checkpoint({str(nf4)!r}, {str(out)!r}, progress=False,\n"
        "    sharding=(mesh, [(r'.*kernel$', P(None, 'x')), (r'.*', P())]))\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    if len(jax.devices()) == 4:
        pytest.skip("this process has the 4 devices the checkpoint was written from")
    with pytest.raises(
        qbridge.CheckpointError, match=r"written from another set of devices .* pass a target"
    ):
        qbridge.restore_converted(out)
    loaded = qbridge.load_checkpoint(nf4, progress=False)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), loaded
    )
    restored = qbridge.restore_converted(out, abstract)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(loaded), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "argv, said",
    [
        (
            ["multiprocess", "x", "--timeout", "-1"],
            "argument --timeout: a positive number of seconds, got -1",
        ),
        (
            ["multiprocess", "x", "--mesh", "abc"],
            "argument --mesh: 'N' or 'DxM' with positive integers, got 'abc'",
        ),
        (["multiprocess", "x", "--mesh", "2x0"], "argument --mesh: 'N' or 'DxM' with positive integers"),
        (["multiprocess", "x", "--processes", "0"], "argument --processes: at least 1, got 0"),
        (["demo", "--seed", "-5"], "argument --seed: at least 0, got -5"),
        (["demo", "--seed", str(2**64)], "argument --seed: below 9223372036854775808"),
        (["parity", "x", "--seed", "-1"], "argument --seed: at least 0, got -1"),
    ],
)
def test_cli_numbers_are_checked_naming_the_option(argv, said, capsys):
    """Numbers and shapes the commands take are checked as they are parsed, naming the option (a negative
    timeout started the processes and killed them; --mesh abc said "invalid literal for int()")."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_cli_paths_that_cannot_be_made_are_named(tmp_path, capsys):
    """A folder the command must create under a file (or where it cannot): one line naming it, exit 2 (was
    a FileNotFoundError traceback)."""
    (tmp_path / "a-file").write_text("")
    assert main(["demo", "--workdir", str(tmp_path / "a-file" / "sub")]) == 2
    assert "a-file" in capsys.readouterr().err


def test_converting_onto_a_link_writes_where_it_leads(nf4, tmp_path):
    """out a link to an Orbax checkpoint, overwrite=True: the checkpoint it leads to is replaced and the
    link stays (it was replaced by a directory, the old link left as hidden debris and its checkpoint stale);
    a link leading nowhere is refused before anything is loaded (a NotADirectoryError naming a partial
    directory, after the whole load)."""
    import os

    real, link = tmp_path / "real.orbax", tmp_path / "link.orbax"
    qbridge.convert_checkpoint(nf4, real, progress=False)
    os.symlink(real, link)
    qbridge.convert_checkpoint(nf4, link, dtype=jnp.float32, overwrite=True, progress=False)
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link.orbax", "real.orbax"]
    assert {a.dtype for a in jax.tree_util.tree_leaves(qbridge.restore_converted(real))} == {
        jnp.dtype("float32")
    }
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.orbax")
    with pytest.raises(ValueError, match=r"dangling\.orbax is a link to .*nowhere, which does not exist"):
        qbridge.convert_checkpoint(nf4, tmp_path / "dangling.orbax", progress=False)
    os.symlink(tmp_path / "loop2", tmp_path / "loop1")
    os.symlink(tmp_path / "loop1", tmp_path / "loop2")
    with pytest.raises(ValueError, match=r"loop1 is a link to .*loop2, a loop of links"):
        qbridge.convert_checkpoint(nf4, tmp_path / "loop1", progress=False)
