"""What a newcomer's natural mistakes get: one clear message naming what to do (found by trying the README
as a new user), and the natural spellings that should simply work (a ``torch.device``, a torch dtype)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_side
import qbridge
from qbridge._cli import main

GPT2_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 64,
               "n_head": 2, "vocab_size": 256}  # fmt: skip


def test_another_architecture_is_named_where_the_builtin_llama_is_asked_for(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2_CONFIG))
    with pytest.raises(
        ValueError, match=r"model_type 'gpt2'\) has no vocab_size|model_type 'gpt2'\) has no hidden_size"
    ):
        qbridge.build_target("llama", tmp_path)
    with pytest.raises(ValueError, match="Llama-like configs"):
        jax_side.LlamaConfig.from_hf(GPT2_CONFIG)


def test_a_missing_directory_is_named_as_missing(tmp_path, capsys):
    nope = tmp_path / "nope"
    with pytest.raises(qbridge.CheckpointError, match="nope: no such checkpoint directory"):
        qbridge.build_target("llama", nope)
    assert main(["parity", str(nope)]) == 2
    assert "nope: no such checkpoint directory" in capsys.readouterr().err
    with pytest.raises(qbridge.CheckpointError, match="nope: no such directory"):
        qbridge.restore_converted(nope)


def test_a_pytorch_checkpoint_given_to_restore_converted_is_named(dense_dir, tmp_path):
    with pytest.raises(
        qbridge.CheckpointError, match=r"not a checkpoint written by convert_checkpoint.*load_checkpoint"
    ):
        qbridge.restore_converted(dense_dir)
    qbridge.convert_checkpoint(dense_dir, tmp_path / "o.orbax", progress=False)
    (tmp_path / "o.orbax" / "_METADATA").write_text("{garbled")
    with pytest.raises(qbridge.CheckpointError, match="the Orbax checkpoint there is damaged or incomplete"):
        qbridge.restore_converted(tmp_path / "o.orbax")


def test_torch_devices_and_dtypes_are_taken(dense_dir):
    params = qbridge.load_checkpoint(
        dense_dir, device=torch.device("cpu"), dtype=torch.bfloat16, progress=False
    )
    leaves = jax.tree.leaves(params)
    assert leaves and all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    assert {d.platform for leaf in leaves for d in leaf.devices()} == {"cpu"}


def test_float64_without_x64_is_refused_up_front(dense_dir):
    assert not jax.config.read("jax_enable_x64")
    with pytest.raises(ValueError, match="x64 off"):
        qbridge.load_checkpoint(dense_dir, dtype="float64", progress=False)
    with pytest.raises(ValueError, match="x64 off"):
        qbridge.load_checkpoint(dense_dir, dtype=torch.float64, progress=False)


def test_the_llama_refuses_ids_without_a_batch_axis():
    pytest.importorskip("flax.nnx")
    config = jax_side.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2)  # fmt: skip
    model = jax_side.llama_for_causal_lm(config)
    with pytest.raises(ValueError, match=r"\[batch, seq\].*ids\[None\]"):
        model(jnp.array([1, 2, 3]))
    assert model(jnp.array([[1, 2, 3]])).shape == (1, 3, 32)


def test_a_kept_weight_indexed_as_a_dense_one_says_how_to_load_it(dense_dir, tmp_path):
    from checkpoints import bnb_llama

    bnb_llama(dense_dir, tmp_path / "nf4", quant_type="nf4", nested=True)
    params = qbridge.load_checkpoint(tmp_path / "nf4", keep_quantized=True, progress=False)
    kept = params["params"]["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(kept, jax_side.NF4Weight)
    with pytest.raises(TypeError, match=r"no dense values to index.*load_quantized_into_nnx"):
        kept[...]
    with pytest.raises(TypeError, match="not iterable"):  # not a sequence through its indexing
        list(kept)


def test_quantized_pieces_in_a_match_error_point_to_load_checkpoint():
    report = jax_side.MatchReport(missing=[], unused=["m.weight.absmax", "m.weight.quant_state.bitsandbytes__nf4",
                                                     "n.weight"], shape_mismatches=[], dtype_mismatches=[],
                                  skipped=[], matched={})  # fmt: skip
    text = str(report)
    assert "2 unused tensors are quantized pieces" in text and "qbridge.load_checkpoint" in text
    plain = jax_side.MatchReport(missing=[], unused=["n.weight"], shape_mismatches=[], dtype_mismatches=[],
                                 skipped=[], matched={})  # fmt: skip
    assert "quantized pieces" not in str(plain)


def test_a_rule_with_another_meshs_axes_says_which_axes_each_mesh_has(dense_dir):
    from qbridge._multiprocess import check_multiprocess_load

    with pytest.raises(ValueError, match="a 1-D mesh has axis 'x', a 2-D mesh 'data' and 'model'"):
        check_multiprocess_load(
            dense_dir, processes=2, cpu_devices=2, mesh_shape=(2, 2), rules=[("kernel$", ["x", None])]
        )


def test_cli_warnings_are_one_line_of_the_command(dense_dir, tmp_path, capsys):
    assert (
        main(
            [
                "convert",
                str(dense_dir),
                str(tmp_path / "o.orbax"),
                "--kind",
                "nothing_matches=linear",
                "--quiet",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "nothing_matches" in line]
    assert lines and all(line.startswith("qbridge convert: UserWarning: ") for line in lines), err
    assert "SystemExit" not in err and "warnings.warn" not in err


def test_demo_refuses_a_device_that_is_not_one_before_any_work(capsys):
    assert main(["demo", "--device", "gpu"]) == 2
    assert (
        "is JAX's name for a GPU; qbridge takes torch's names: use 'cpu', 'cuda'" in capsys.readouterr().err
    )
    if not torch.cuda.is_available():
        assert main(["demo", "--device", "cuda"]) == 2
        assert "sees no CUDA GPU here" in capsys.readouterr().err


def test_demo_keeps_what_it_did_not_write_in_its_workdir(tmp_path, capsys):
    from qbridge._demo import DEMO_CONFIG

    mine = tmp_path / "llama-nf4"
    mine.mkdir()
    (mine / "config.json").write_text('{"hidden_size": 4096}')
    (tmp_path / "llama-bf16").mkdir()
    # another checkpoint: replaced only with --overwrite
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "llama-nf4 holds a checkpoint an earlier demo did not write" in err and "--overwrite" in err, err
    # files no checkpoint has, even beside the demo's own config: never removed, with --overwrite neither
    (mine / "config.json").write_text(json.dumps(DEMO_CONFIG))
    (mine / "NOTES.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):
        assert main(["demo", "--workdir", str(tmp_path), *flags]) == 2
        assert "llama-nf4 holds NOTES.txt, which are not files of a checkpoint" in capsys.readouterr().err
    assert (mine / "NOTES.txt").read_text() == "mine" and (mine / "config.json").exists()
    # a link is no folder of the demo's
    (mine / "NOTES.txt").unlink()
    (tmp_path / "llama-bf16").rmdir()
    (tmp_path / "llama-bf16").symlink_to(mine)
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "llama-bf16 exists and is no folder (a file or a link)" in capsys.readouterr().err
    assert (mine / "config.json").exists()
    # shards numbered in other scripts' digits are no files the demo writes
    (tmp_path / "llama-bf16").unlink()
    (mine / "model-١-of-٢.safetensors").write_bytes(b"mine")
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "which are not files of a checkpoint" in capsys.readouterr().err
    assert (mine / "model-١-of-٢.safetensors").exists()
    # a workdir that is a file: refused before any work
    (tmp_path / "afile").write_text("mine")
    assert main(["demo", "--workdir", str(tmp_path / "afile")]) == 2
    assert "afile is a file; --workdir names a folder" in capsys.readouterr().err


def test_parity_help_describes_every_argument(capsys):
    with pytest.raises(SystemExit):
        main(["parity", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for words in (
        "config.json and the weights",
        "sequence length",
        "sequences per batch",
        "seed of the random",
    ):
        assert words in out, out


def test_inspect_counts_many_lines_of_one_kind():
    """A checkpoint of 8-bit weights tags every weight (``weight_format``), and partial FP8 tiles come on every
    expert: the summary says so in a line each, and keeps every one in its fields."""
    from qbridge._inspect import SHOWN, CheckpointSummary

    tags = [f"model.layers.{i}.mlp.down_proj.weight_format" for i in range(28)]
    care = [f"model.layers.{i}.mlp.down_proj.weight: [200, 130] with 128x128 blocks" for i in range(28)]
    summary = CheckpointSummary(path="x", format="bitsandbytes-8bit", files=1, quantization_config={}, kinds={},
                                stored_bytes=0, dense_bytes=0, skipped=[*tags, "lm_head.weight"], care=care,
                                skip_reasons={**dict.fromkeys(tags, "bitsandbytes 8-bit weight-layout tag"),
                                              "lm_head.weight": "tied to the embedding"},
                                classified_by="names", guessed=[])  # fmt: skip
    text = str(summary).splitlines()
    assert sum("weight_format" in line for line in text) == 1
    assert "  28 tensors, bitsandbytes 8-bit weight-layout tag: " in "\n".join(text)
    assert "  lm_head.weight: tied to the embedding" in text
    assert sum("with 128x128 blocks" in line for line in text) == SHOWN
    assert "  ... 28 in all (CheckpointSummary.care lists every one)" in text


def test_dequantize_to_jax_takes_torchao_weights_and_any_dtype_spelling():
    """torchao's tensor subclasses have no storage of their own (their dequantized weight is new memory)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(64, 32).bfloat16()
    quantize_(layer, Int8WeightOnlyConfig())
    want = layer.weight.dequantize().float().numpy()
    for dtype in (torch.float32, jnp.float32, "float32"):
        got = qbridge.dequantize_to_jax(layer.weight, dtype=dtype)
        assert got.dtype == jnp.float32 and (jax.device_get(got) == want).all()
    assert qbridge.dequantize_to_jax(layer.weight, transpose=True).shape == (64, 32)


def test_to_jax_checks_its_arguments_on_every_device():
    t = torch.ones(3)
    assert qbridge.to_jax(t, device="cpu").devices() == {jax.devices("cpu")[0]}
    assert qbridge.to_jax(t, device=torch.device("cpu")).devices() == {jax.devices("cpu")[0]}
    with pytest.raises(TypeError, match="producer must be 'auto', 'current'"):
        qbridge.to_jax(t, producer="curent")  # a typo is caught here too, not first on a GPU
    for bad in (b"", bytearray()):  # bytes are a sequence, not of streams
        with pytest.raises(TypeError, match="producer must be 'auto', 'current'"):
            qbridge.to_jax(t, producer=bad)
    for bad in ("yes", 1, 0.0, np.array([True, False]), torch.tensor(True)):
        with pytest.raises(TypeError, match="copy must be None, True or False"):
            qbridge.to_jax(t, copy=bad)
    assert qbridge.to_jax(t, copy=np.True_).unsafe_buffer_pointer() != t.data_ptr()  # a NumPy bool is one
    # to_jax_many: the call's arguments, named as such (not as tensors[0]'s), even for an empty list
    for tensors in ([], [t, t]):
        for kwargs, error, match in [
            (dict(producer="curent"), TypeError, r"^producer must be 'auto', 'current'"),
            (dict(copy="yes"), TypeError, r"^copy must be None, True or False"),
            (dict(device=0), TypeError, r"^device must be a jax.Device"),
            (dict(device="tpu"), ValueError, "tpu"),
        ]:
            with pytest.raises(error, match=match):
                qbridge.to_jax_many(tensors, **kwargs)
    with pytest.raises(ValueError, match="beyond float32's range"):
        qbridge.to_jax(torch.tensor([1.0, 1e300], dtype=torch.float64))  # it would become inf
    with pytest.warns(UserWarning, match="rounded"):
        qbridge.to_jax(torch.tensor([1.0, float("inf"), 1e-300], dtype=torch.float64))  # inf stays inf
    with pytest.raises(TypeError, match="under a JAX transformation"):
        jax.jit(qbridge.to_torch)(jnp.ones(2))


def test_jax_side_names_torch_tensors_given_to_it():
    w = torch.randn(4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"w is a torch tensor.*qbridge.to_jax"):
        jax_side.dequantize_fp8(w, torch.ones(1, 1))
    with pytest.raises(TypeError, match=r"checkpoint\['weight'\] is a torch tensor"):
        jax_side.match_to_target({"weight": torch.ones(2, 2)}, {"kernel": jnp.zeros((2, 2))})


def test_a_float_block_size_is_refused_as_a_block_size():
    import torch_side

    w = torch.randn(256, 256).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"block_size must be a positive int or a pair of them, got 128\.0"):
        torch_side.dequantize_fp8(w, torch.rand(2, 2), torch.bfloat16, block_size=128.0)


@pytest.mark.parametrize("block", [128.0, np.float32(128), "128", (128, 128.0), True, (True, True)])
def test_jax_sides_block_sizes_are_refused_as_torch_sides_are(block):
    """A float, a string or a bool where a block size goes: the block-size message from jax_side's
    dequantize_fp8 and FP8Weight too (a float was a bare "'float' object is not iterable", True was
    taken for 1); ints of any kind decode as the int does."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((200, 300)), jnp.float8_e4m3fn)
    s = jnp.asarray(np.random.default_rng(1).random((2, 3)) + 0.5, jnp.float32)
    says = r"block_size must be a positive int or a pair of them, got "
    # a weight of good blocks used first (as earlier calls of a process do): the bad one is still refused with
    # the block-size message, not JAX's when it compares the two as pytree metadata in its cache
    jax_side.quantized_matmul(jnp.ones((2, 300)), jax_side.FP8Weight(w, s, block=(128, 128)))
    with pytest.raises(ValueError, match=says):
        jax_side.dequantize_fp8(w, s, block_size=block)
    with pytest.raises(ValueError, match=says):
        jax_side.quantized_matmul(jnp.ones((2, 300)), jax_side.FP8Weight(w, s, block=block))
    with pytest.raises(ValueError, match=says):  # read before a per-tensor scale answers, as torch_side does
        jax_side.dequantize_fp8(w, s[:1, :1], block_size=block)
    want = np.asarray(jax_side.dequantize_fp8(w, s, block_size=128))
    for size in (np.int64(128), (np.int64(128), 128)):
        np.testing.assert_array_equal(np.asarray(jax_side.dequantize_fp8(w, s, block_size=size)), want)


def test_block_sizes_are_checked_the_same_whatever_was_decoded_before():
    import torch_side

    w, s = torch.randn(256, 256).to(torch.float8_e4m3fn), torch.rand(2, 2)
    want = torch_side.dequantize_fp8(w, s, torch.bfloat16, block_size=128)  # remembers this layout
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        torch_side.dequantize_fp8(w, s, torch.bfloat16, block_size=128.0)  # 128.0 hashes as 128 does
    for size in (np.int64(128), (np.int64(128), 128), torch.Size([128, 128])):  # ints of any kind
        assert torch.equal(torch_side.dequantize_fp8(w, s, torch.bfloat16, block_size=size), want)


def test_float64_near_float32s_largest_value_rounds_to_it():
    big = float(np.finfo(np.float32).max)
    with pytest.warns(UserWarning, match="rounded"):
        got = qbridge.to_jax(torch.tensor([-big * (1 + 1e-12), big * (1 + 1e-9)], dtype=torch.float64))
    assert (np.abs(np.asarray(got)) == np.float32(big)).all()  # rounded to the largest float32, not inf
    with pytest.raises(ValueError, match="beyond float32's range"):
        qbridge.to_jax(torch.tensor([2.0**128], dtype=torch.float64))
    with pytest.raises(ValueError, match="in either part"):
        qbridge.to_jax(torch.tensor([complex(1.0, -(2.0**200))], dtype=torch.complex128))
    with pytest.raises(ValueError, match="beyond float32's range"):  # beside NaN and inf: the slower check
        qbridge.to_jax(torch.tensor([float("nan"), float("inf"), 2.0**130], dtype=torch.float64))


def test_messages_name_the_argument_and_the_transformation():
    with pytest.raises(TypeError, match=r"transformation \(jit, grad, vmap\)"):
        jax.grad(lambda a: qbridge.to_torch(a).sum())(jnp.ones(2))
    with pytest.raises(TypeError, match="packed is a torch tensor"):
        jax_side.dequantize_nf4(torch.zeros(8, dtype=torch.uint8), jnp.ones(1), shape=(4, 4))
    with pytest.raises(ValueError, match="JAX has 1 CPU device"):
        qbridge.to_jax(torch.ones(2), device="cpu:3")
    from jax_side._layout import refuse_torch

    refuse_torch(torch.Size([2, 2]), "a shape")  # a torch.Size is a shape, not a tensor: not refused


@pytest.mark.parametrize(
    "kinds, rename, error",
    [
        ({"(": "linear"}, None, r"kinds rule '\(' is no regular expression"),
        ({"mlp": "nonsense"}, None, r"kinds rule 'mlp': unknown module kind 'nonsense'"),
        ({"zzz_matches_nothing": "nonsense"}, None, r"unknown module kind 'nonsense'"),
        (None, {"(": "x"}, r"rename rule '\(' is no regular expression"),
        (None, {"a": 1}, r"rename rule 'a': 1: the pattern and the replacement must be strings"),
        (None, ["a"], r"rename must be a mapping"),
    ],
)
def test_bad_kinds_and_rename_rules_are_named(dense_dir, kinds, rename, error):
    with pytest.raises((ValueError, TypeError), match=error):
        qbridge.load_checkpoint(dense_dir, device="cpu", kinds=kinds, rename=rename)


def test_a_kinds_rule_for_another_rank_is_refused_naming_the_tensor(tmp_path):
    """stacked_linear on per-expert 2-D weights (as the README's example pattern can match) used to keep
    torch's [out, in] layout under the name kernel."""
    from safetensors.torch import save_file

    tensors = {f"model.layers.0.mlp.experts.{e}.down_proj.weight": torch.randn(20, 30) for e in range(3)}
    (tmp_path / "ck").mkdir()
    save_file(tensors, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(ValueError, match=r"experts.0.down_proj.weight: kinds= names its module 'stacked_linear'"
                       r", whose 'weight' is a rank-3 tensor, but this one is rank 2 \(20, 30\)"):  # fmt: skip
        qbridge.load_checkpoint(tmp_path / "ck", device="cpu", kinds={"experts": "stacked_linear"})
    # without the rule, each expert's weight is a Linear's: its kernel is the transpose
    params = qbridge.load_checkpoint(tmp_path / "ck", device="cpu")
    expert = params["params"]["model"]["layers"]["0"]["mlp"]["experts"]["0"]
    assert expert["down_proj"]["kernel"].shape == (30, 20)


@pytest.mark.parametrize("stored_prefix, target_scope", [("encoder.", None), ("", "model")])
def test_a_match_error_of_a_prefix_says_which_rename_matches(tmp_path, stored_prefix, target_scope):
    """Checkpoint keys with a prefix the target's names lack (or the other way round): the error says
    which rename= rule would match them, and that rule loads."""
    import flax.linen as nn
    from safetensors.torch import save_file

    tensors = {f"{stored_prefix}fc1.weight": torch.randn(8, 4), f"{stored_prefix}fc1.bias": torch.randn(8)}
    (tmp_path / "ck").mkdir()
    save_file(tensors, tmp_path / "ck" / "model.safetensors")

    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="fc1")(x)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Inner(name="model")(x)

    target = (Outer() if target_scope else Inner()).init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(jax_side.MatchError) as e:
        qbridge.load_checkpoint(tmp_path / "ck", target=target, device="cpu")
    rule = {r"^encoder\.": ""} if stored_prefix else {"^": "model."}
    assert f"rename={rule!r}" in str(e.value), str(e.value)
    params = qbridge.load_checkpoint(tmp_path / "ck", target=target, device="cpu", rename=rule)
    inner = params["params"]["model"] if target_scope else params["params"]
    np.testing.assert_array_equal(
        np.asarray(inner["fc1"]["bias"]), tensors[f"{stored_prefix}fc1.bias"].numpy()
    )


def test_tensors_a_kinds_rule_decided_are_not_reported_as_guessed(tmp_path):
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.{name}.weight": torch.randn(20, 30) for i in range(2) for name in ("up", "down")}
    (tmp_path / "ck").mkdir()
    save_file(tensors, tmp_path / "ck" / "model.safetensors")
    _, report = qbridge.load_checkpoint(tmp_path / "ck", device="cpu", return_report=True)
    assert sorted(report.guessed) == sorted(tensors)  # no config: every layout is a guess by name
    _, report = qbridge.load_checkpoint(
        tmp_path / "ck", device="cpu", return_report=True, kinds={r"down$": "linear"}
    )
    assert sorted(report.guessed) == ["layers.0.up.weight", "layers.1.up.weight"]


@pytest.mark.parametrize("torch_dtype", [None, "float32"])
def test_inspect_says_what_quantized_weights_decode_to(tmp_path, torch_dtype):
    """A new user loaded an FP8 checkpoint as float32 and got its bfloat16 decode widened; inspect now says
    what each kind decodes to before any cast."""
    from safetensors.torch import save_file

    (tmp_path / "ck").mkdir()
    save_file({"k.weight": torch.randn(300, 500).to(torch.float8_e4m3fn), "k.weight_scale_inv": torch.rand(3, 4)},
              tmp_path / "ck" / "model.safetensors")  # fmt: skip
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    if torch_dtype:
        config["torch_dtype"] = torch_dtype
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    summary = qbridge.inspect_checkpoint(tmp_path / "ck")
    assert summary.decoded_to == {"fp8": [torch_dtype or "bfloat16"]}
    assert f"decoded to: fp8 {torch_dtype or 'bfloat16'}" in str(summary)
    params = qbridge.load_checkpoint(tmp_path / "ck", device="cpu")
    assert params["params"]["k"]["kernel"].dtype == jnp.dtype(torch_dtype or "bfloat16")


def test_a_grouped_transposed_convolution_is_named_in_the_mismatch(tmp_path):
    """torch's ConvTranspose2d(groups=2) stores out/groups output features; Flax's ConvTranspose has no
    groups: the MatchError says so where it only gave the two shapes."""
    from flax import nnx
    from safetensors.torch import save_file

    class Torch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.ConvTranspose2d(4, 6, 3, groups=2)
            self.head = torch.nn.Linear(6, 5)

    save_file(Torch().state_dict(), tmp_path / "model.safetensors")

    class Flax(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(4, 6, (3, 3), rngs=rngs)
            self.head = nnx.Linear(6, 10, rngs=rngs)

    with pytest.raises(jax_side.MatchError) as e:
        qbridge.load_checkpoint(tmp_path, target=Flax(nnx.Rngs(0)))
    lines = str(e.value).splitlines()
    up = next(line for line in lines if "'up.kernel'" in line)
    assert "expects (3, 3, 4, 6)" in up and "ConvTranspose with groups=2" in up, up
    head = next(line for line in lines if "'head.kernel'" in line)
    assert "groups" not in head, head  # a Dense kernel twice as wide is no such case

    # a plain convolution into one with twice the outputs: no word of transposed convolutions
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 3, 3)

    save_file(Plain().state_dict(), tmp_path / "model.safetensors")

    class Wider(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(4, 6, (3, 3), rngs=rngs)

    with pytest.raises(jax_side.MatchError) as e:
        qbridge.load_checkpoint(tmp_path, target=Wider(nnx.Rngs(0)))
    assert "expects (3, 3, 4, 6)" in str(e.value) and "ConvTranspose" not in str(e.value), str(e.value)


def test_a_gpt2_conv1d_read_for_a_dense_target_names_the_kind_to_give(tmp_path):
    """A linen params dict carries no module types: GPT-2's Conv1D kernels are laid out [out, in], as
    transformers' FlaxGPT2 held them. A port built on Dense expects [in, out]; the mismatch gives one kinds=
    rule for every module of those names, the square attn.c_proj too (whose shape matches either way), and
    that rule loads Conv1D's stored [in, out] exactly, with the target and without one."""
    import re

    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=32)
    torch_model = transformers.GPT2LMHeadModel(config)
    torch_model.save_pretrained(tmp_path)
    loaded = qbridge.load_checkpoint(tmp_path, device="cpu")

    def dense(path, a):
        name = jax.tree_util.keystr(path)
        conv1d = any(s in name for s in ("c_attn", "c_fc", "c_proj")) and "kernel" in name
        return jax.ShapeDtypeStruct(a.shape[::-1] if conv1d else a.shape, a.dtype)

    target = jax.tree_util.tree_map_with_path(dense, loaded)
    with pytest.raises(jax_side.MatchError) as e:
        qbridge.load_checkpoint(tmp_path, target=target, device="cpu")
    assert "'transformer.h.0.attn.c_attn.kernel' expects (64, 192)" in str(e.value)
    assert "'transformer.h.0.attn.c_proj.kernel'" not in str(e.value)  # square: its shape matches
    pattern = re.search(r"kinds=\{r'(.+?)': 'linear'\}", str(e.value)).group(1)
    assert pattern == r"(c_attn|c_fc|c_proj)(\.|$)", str(e.value)
    # a Linear's kernel the wrong way round in the target: no kinds= advice (linear is its kind already)
    torch_model.lm_head = torch.nn.Linear(64, 100, bias=False)
    torch_model.save_pretrained(tmp_path / "untied")
    flipped = dict(loaded["params"])
    flipped["lm_head"] = {"kernel": jax.ShapeDtypeStruct((100, 64), jnp.float32)}
    with pytest.raises(jax_side.MatchError) as e:
        qbridge.load_checkpoint(tmp_path / "untied", target={"params": flipped}, device="cpu")
    assert "'lm_head.kernel' expects (100, 64)" in str(e.value) and "kinds=" not in str(e.value), str(e.value)
    block = torch_model.transformer.h[0]
    for given in (target, None):
        params = qbridge.load_checkpoint(tmp_path, target=given, device="cpu", kinds={pattern: "linear"})
        got = params["params"]["transformer"]["h"]["0"]
        for module, kernel in ((block.attn.c_attn, got["attn"]["c_attn"]["kernel"]),
                               (block.attn.c_proj, got["attn"]["c_proj"]["kernel"]),
                               (block.mlp.c_proj, got["mlp"]["c_proj"]["kernel"])):  # fmt: skip
            np.testing.assert_array_equal(np.asarray(kernel), module.weight.detach().numpy())  # [in, out]


def test_a_config_dtype_quantized_weights_cannot_decode_to_is_refused(tmp_path):
    """FP8 weights decode to config.json's torch_dtype; one qbridge does not know (float64, "auto") had
    silently given bfloat16. A dense checkpoint with such a config still loads (the dtype is not used)."""
    from safetensors.torch import save_file

    for quantized in (True, False):
        folder = tmp_path / str(quantized)
        folder.mkdir()
        tensors = {"k.weight": torch.randn(64, 128)}
        config: dict = {"torch_dtype": "float64"}
        if quantized:
            tensors = {
                "k.weight": tensors["k.weight"].to(torch.float8_e4m3fn),
                "k.weight_scale_inv": torch.rand(1, 1),
            }
            config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        save_file(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config))
        if quantized:
            for name in ("float64", "auto"):
                (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": name}))
                with pytest.raises(
                    qbridge.CheckpointError, match=rf"torch_dtype is '{name}', and quantized weights"
                ):
                    qbridge.load_checkpoint(folder, device="cpu")
            # transformers 5 keeps dtype where both are given: so does the decode
            for fields, want in (({"torch_dtype": "auto", "dtype": "float16"}, jnp.float16),
                                 ({"torch_dtype": "float16", "dtype": "bfloat16"}, jnp.bfloat16)):  # fmt: skip
                (folder / "config.json").write_text(json.dumps({**config, **fields}))
                assert qbridge.load_checkpoint(folder, device="cpu")["params"]["k"]["kernel"].dtype == want
        else:
            params = qbridge.load_checkpoint(folder, device="cpu")
            assert params["params"]["k"]["kernel"].shape == (128, 64)


def test_kept_layer_helpers_name_arguments_of_the_wrong_kind():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"params must be a nested dict of arrays .* got list"):
        jax_side.load_quantized_into_nnx(model, [1, 2])
    with pytest.raises(
        TypeError,
        match=r"config must be a jax_side.LoraConfig, got builtins.dict .*LoraConfig.from_peft\(peft_config.to_dict\(\)\)",
    ):
        jax_side.add_lora(model, {"r": 4})
