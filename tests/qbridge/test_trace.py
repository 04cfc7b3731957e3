"""qbridge.parity.trace: layer-by-layer parity between a torch model and its Flax port. A correct port agrees
everywhere; each planted fault is found at the module that holds it; unpaired modules are listed."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoints import LLAMA, bnb_llama, dense_llama, fp8_llama

import jax_side
import qbridge
from qbridge._cli import main
from qbridge.parity import trace

transformers = pytest.importorskip("transformers")
nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()  # float32
    model.save_pretrained(root / "f32")
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    bnb_llama(root / "bf16", root / "nf4", quant_type="nf4", nested=True)
    return root


def _pair(made, name="f32", **load):
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        made / name, attn_implementation="eager", device_map="cpu"
    ).eval()
    config = jax_side.LlamaConfig.from_hf(json.loads((made / name / "config.json").read_text()))
    dtype = jnp.float32 if name == "f32" else jnp.bfloat16
    flax_model = jax_side.llama_for_causal_lm(config, param_dtype=dtype)
    params = qbridge.load_checkpoint(made / name, target=flax_model, progress=False, **load)
    if load.get("keep_quantized"):
        jax_side.load_quantized_into_nnx(flax_model, params)
    else:
        nnx.update(flax_model, params)
    return torch_model, flax_model


IDS = torch.from_numpy(np.random.default_rng(0).integers(0, LLAMA["vocab_size"], (2, 11)))


def test_a_correct_port_agrees_end_to_end(made):
    torch_model, flax_model = _pair(made)
    report = trace(torch_model, flax_model, IDS)
    assert report.ok and report.first_divergence is None
    names = [p.name for p in report.pairs]
    assert names[0] == "model.embed_tokens" and names[-1] == "" and "model.layers.1.mlp.down_proj" in names
    assert (
        names.index("model.layers.0.self_attn.q_proj")
        < names.index("model.layers.0.self_attn")
        < names.index("model.layers.0")
    )
    # what has no Flax counterpart is listed, not ignored: the rotary module and the activation modules
    assert set(report.unpaired_torch) == {
        "model.rotary_emb",
        "model.layers.0.mlp.act_fn",
        "model.layers.1.mlp.act_fn",
    }
    assert report.unpaired_flax == []
    text = str(report)
    assert "the two models agree" in text and "model.rotary_emb" in text
    for ids in (IDS.numpy(), jnp.asarray(IDS.numpy()), {"input_ids": IDS.numpy()}):  # arrays of other kinds
        again = trace(torch_model, flax_model, ids)
        assert again.first_divergence is None and [p.max_abs for p in again.pairs] == [
            p.max_abs for p in report.pairs
        ]


def test_a_transposed_dense_kernel(made):
    torch_model, flax_model = _pair(made)
    kernel = flax_model.model.layers[1].self_attn.q_proj.kernel  # square: every shape check passes
    kernel[...] = kernel[...].T
    report = trace(torch_model, flax_model, IDS)
    assert report.first_divergence == "model.layers.1.self_attn.q_proj"
    assert all(p.ok for p in report.pairs if p.name.startswith("model.layers.0"))


@pytest.mark.parametrize("fault", ["hidden states for logits", "logits as [batch, vocab, seq]"])
def test_a_port_whose_output_is_not_torchs_fails_at_the_model(made, fault):
    """The models' own outputs are paired as their modules are: a port that returns another shape (no
    lm_head applied; a layout of its own) fails at ``(model)``. Both were "the two models agree" (the outputs
    left unpaired, and a [batch, vocab, seq] output moved back by the channels-last rule for convolutions,
    which this model has none of)."""
    torch_model, flax_model = _pair(made)
    cls = type(flax_model)

    class Wrong(cls):
        def __call__(self, ids):
            if fault == "hidden states for logits":
                return self.model(ids)
            return jnp.swapaxes(cls.__call__(self, ids), 1, 2)

    flax_model.__class__ = Wrong
    report = trace(torch_model, flax_model, IDS)
    assert not report.ok and report.first_divergence == ""
    (model,) = [p for p in report.pairs if p.name == ""]
    want = (
        (2, 11, LLAMA["hidden_size"]) if fault == "hidden states for logits" else (2, LLAMA["vocab_size"], 11)
    )
    assert model.shape == (2, 11, LLAMA["vocab_size"]) and model.flax_shape == want
    assert model.max_abs == np.inf and np.isnan(model.cosine)
    assert all(p.ok for p in report.pairs if p.name != "")  # the layers before it agree
    assert f"FAIL: the Flax output is {'x'.join(map(str, want))}  <- first divergence" in str(report)
    assert "the two models agree" not in str(report)


def test_a_wrong_norm_epsilon(made):
    torch_model, flax_model = _pair(made)
    flax_model.model.layers[1].post_attention_layernorm.eps = 1e-2
    assert trace(torch_model, flax_model, IDS).first_divergence == "model.layers.1.post_attention_layernorm"


def test_swapped_rotary_halves(made, monkeypatch):
    import jax_side._llama as port

    torch_model, flax_model = _pair(made)
    monkeypatch.setattr(
        port,
        "_rotate_half",
        lambda x: jnp.concatenate([x[..., x.shape[-1] // 2 :], -x[..., : x.shape[-1] // 2]], axis=-1),
    )
    report = trace(torch_model, flax_model, IDS)
    assert (
        report.first_divergence == "model.layers.0.self_attn"
    )  # the attention block's own code, not o_proj after it
    by_name = {p.name: p for p in report.pairs}
    assert (
        by_name["model.layers.0.self_attn.q_proj"].ok
        and not by_name["model.layers.0.self_attn.o_proj"].input_ok
    )


def test_an_fp16_softmax(made, monkeypatch):
    torch_model, flax_model = _pair(made)
    softmax = jax.nn.softmax
    monkeypatch.setattr(
        jax.nn, "softmax", lambda x, axis=-1: softmax(x.astype(jnp.float16), axis=axis).astype(x.dtype)
    )
    report = trace(torch_model, flax_model, IDS)
    assert report.first_divergence == "model.layers.0.self_attn"


@pytest.mark.parametrize("keep", [False, True])
def test_quantized_torch_against_the_flax_model_qbridge_loaded(made, keep):
    torch_model, flax_model = _pair(made, "nf4", keep_quantized=keep)
    assert type(torch_model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    if keep:
        assert isinstance(flax_model.model.layers[0].mlp.down_proj, jax_side.QuantLinear)
    report = trace(torch_model, flax_model, IDS)
    assert report.first_divergence is None, str(report)
    assert {p.dtype for p in report.pairs} == {"bfloat16"} and len(report.pairs) == 29


@pytest.mark.parametrize("keep", [False, True], ids=["dense", "kept"])
@pytest.mark.parametrize("widths", [(200, 300), (192, 320)], ids=["grid-divides", "grid-does-not-divide"])
def test_fp8_partial_tiles_against_an_exact_reference(tmp_path, keep, widths):
    """FP8 weights with partial 128-tiles. transformers 5 decodes them on a CPU with blocks sized from the
    scale grid: 200 rows in 2 scale rows as blocks of 100 (wrong values, every layer would look wrong), and
    192 rows in 2 it refuses outright. The reference then holds the exact decode (replacing the wrong
    weights, or in transformers' model of the config without quantization), the report's note says which,
    and the models agree."""
    from qbridge.parity import trace_checkpoint

    hidden, inter = widths
    sizes = dict(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2)
    dense_llama(tmp_path / "dense", sizes=sizes)
    fp8_llama(tmp_path / "dense", tmp_path / "fp8")
    root = transformers.utils.logging.get_logger()
    logging_before = (list(root.handlers), root.propagate, transformers.utils.logging.get_verbosity())
    report = trace_checkpoint(tmp_path / "fp8", keep_quantized=keep, tokens=7)
    assert (list(root.handlers), root.propagate, transformers.utils.logging.get_verbosity()) == logging_before
    assert report.first_divergence is None, str(report)
    try:
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", device_map="cpu")
    except RuntimeError:  # transformers refuses the checkpoint
        assert len(report.notes) == 1 and "could not build the FP8 model" in report.notes[0], report.notes
        # why, from transformers' load report (its error refers to that report, which is not shown)
        assert "above report" not in report.notes[0] and "Error: " in report.notes[0], report.notes
        assert re.search(r"in its weight conversion: model\.layers\.\d+\.\S+\.weight: ", report.notes[0])
        return
    if torch_model.model.layers[0].mlp.down_proj.weight.element_size() > 1:  # decoded by transformers
        assert len(report.notes) == 1 and "exact decode" in report.notes[0] and "note: " in str(report)
    else:
        assert report.notes == []


def test_a_linen_port_with_numbered_names_and_channels_last_images():
    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)])
            self.extra = torch.nn.Identity()

        def forward(self, x):
            h = self.extra(self.conv(x)).mean(dim=(2, 3))
            for layer in self.layers:
                h = layer(h)
            return h

    class FlaxNet(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = linen.Conv(8, (3, 3), padding=1, name="conv")(x).mean(axis=(1, 2))
            h = linen.Dense(8, name="layers_0")(h)
            return linen.Dense(4, name="layers_1")(h)

    torch.manual_seed(0)
    net = TorchNet().eval()
    variables = jax_side.to_flax_variables(
        {k: v.detach().numpy() for k, v in net.state_dict().items()}, numbered="underscore"
    )
    x = torch.randn(2, 3, 6, 6)
    flax_x = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    report = trace(net, FlaxNet(), x, variables=variables, flax_inputs=(flax_x,))
    assert report.ok and [p.name for p in report.pairs] == ["conv", "layers.0", "layers.1", ""]
    assert report.unpaired_torch == ["extra"]


def test_layouts_a_correct_port_may_use_and_one_it_may_not():
    """Per module, not per model: a Conv1d front end's output is channels-first in torch and channels-last
    in Flax (moved back), a square one too (8 channels at 8 steps: compared as stored, it failed); a head
    split by nnx.LinearGeneral ([batch, seq, heads, dim] against [batch, seq, heads * dim]) is reshaped (it
    failed); and logits returned as [batch, vocab, seq] fail at the model although the model has a
    convolution (any convolution anywhere let every module's last axis be moved, and it passed)."""
    channels, width, vocab, heads = 4, 8, 10, 2

    class Torch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(channels, width, 3, padding=1)
            self.q_proj = torch.nn.Linear(width, width)
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, x):  # x [batch, channels, steps]
            h = self.conv(x).transpose(1, 2)
            return self.head(self.q_proj(h))  # [batch, steps, vocab]

    class Flax(nnx.Module):
        def __init__(self, t, transposed):
            self.transposed = transposed
            self.conv = nnx.Conv(channels, width, (3,), padding=1, rngs=nnx.Rngs(0))
            self.conv.kernel[...] = jnp.asarray(t.conv.weight.detach().numpy().transpose(2, 1, 0))
            self.conv.bias[...] = jnp.asarray(t.conv.bias.detach().numpy())
            self.q_proj = nnx.LinearGeneral(width, (heads, width // heads), rngs=nnx.Rngs(0))
            self.q_proj.kernel[...] = jnp.asarray(
                t.q_proj.weight.detach().numpy().T.reshape(width, heads, -1)
            )
            self.q_proj.bias[...] = jnp.asarray(t.q_proj.bias.detach().numpy().reshape(heads, -1))
            self.head = nnx.Linear(width, vocab, rngs=nnx.Rngs(0))
            self.head.kernel[...] = jnp.asarray(t.head.weight.detach().numpy().T)
            self.head.bias[...] = jnp.asarray(t.head.bias.detach().numpy())

        def __call__(self, x):  # x [batch, steps, channels]
            q = self.q_proj(self.conv(x))
            logits = self.head(q.reshape(*q.shape[:2], width))
            if self.transposed == "flat":  # [batch, steps * vocab]: merged, not split (it passed, reshaped)
                return logits.reshape(logits.shape[0], -1)
            return jnp.swapaxes(logits, 1, 2) if self.transposed else logits

    torch.manual_seed(0)
    net = Torch().eval()
    for steps in (7, width):  # 8 steps: the conv's output is square
        x = torch.randn(2, channels, steps)
        flax_x = (jnp.asarray(x.numpy().transpose(0, 2, 1)),)
        report = trace(net, Flax(net, transposed=False), x, flax_inputs=flax_x)
        assert report.ok and [p.name for p in report.pairs] == ["conv", "q_proj", "head", ""], str(report)
        report = trace(net, Flax(net, transposed=True), x, flax_inputs=flax_x)
        assert report.first_divergence == "" and [p.name for p in report.pairs if not p.ok] == [""], str(
            report
        )
        assert report.pairs[-1].flax_shape == (2, vocab, steps)
        report = trace(net, Flax(net, transposed="flat"), x, flax_inputs=flax_x)
        assert report.first_divergence == "" and report.pairs[-1].flax_shape == (2, steps * vocab)


def _conv(t, f):
    w = t.weight.detach().numpy()
    f.kernel[...] = jnp.asarray(np.moveaxis(w, [0, 1], [-1, -2]) if w.ndim == 4 else w.transpose(2, 1, 0))
    f.bias[...] = jnp.asarray(t.bias.detach().numpy())


def _linear(t, f):
    f.kernel[...] = jnp.asarray(t.weight.detach().numpy().T)
    f.bias[...] = jnp.asarray(t.bias.detach().numpy())


def test_blocks_that_permute_back_to_channels_first_and_square_outputs_agree():
    """A ConvNeXt-style block (depthwise conv, then LayerNorm and a Linear on channels-last data, permuted
    back in torch), and a residual block whose channels equal its height and width (6 at 6x6; its ReLU a
    function in Flax): correct ports agree (each failed: the block's last submodule sees one layout on both
    sides; a square output's layout cannot be told from its shape; an in-place ReLU or `out += x` changed
    outputs the hooks had recorded)."""

    class Block(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.dwconv = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
            self.norm, self.pw = torch.nn.LayerNorm(c), torch.nn.Linear(c, c)

        def forward(self, x):
            return x + self.pw(self.norm(self.dwconv(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    class Res(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)
            self.relu, self.conv2 = torch.nn.ReLU(inplace=True), torch.nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):  # in place, as torchvision's blocks: the hooks keep each output as it was
            out = self.conv2(self.relu(self.bn1(self.conv1(x))))
            out += x
            return out

    class Net(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.stem, self.block = torch.nn.Conv2d(3, c, 2, stride=2), Block(c)
            self.narrow, self.res, self.head = torch.nn.Conv2d(c, 6, 1), Res(6), torch.nn.Linear(6, 5)

        def forward(self, x):
            return self.head(self.res(self.narrow(self.block(self.stem(x)))).mean((2, 3)))

    class FlaxBlock(nnx.Module):
        def __init__(self, c, rngs):
            self.dwconv = nnx.Conv(c, c, (3, 3), padding=1, feature_group_count=c, rngs=rngs)
            self.norm, self.pw = nnx.LayerNorm(c, epsilon=1e-5, rngs=rngs), nnx.Linear(c, c, rngs=rngs)

        def __call__(self, x):
            return x + self.pw(self.norm(self.dwconv(x)))

    class FlaxRes(nnx.Module):
        def __init__(self, c, rngs):
            self.conv1 = nnx.Conv(c, c, (3, 3), padding=1, rngs=rngs)
            self.bn1 = nnx.BatchNorm(c, use_running_average=True, rngs=rngs)
            self.conv2 = nnx.Conv(c, c, (3, 3), padding=1, rngs=rngs)

        def __call__(self, x):
            return x + self.conv2(nnx.relu(self.bn1(self.conv1(x))))

    class FlaxNet(nnx.Module):
        def __init__(self, c, rngs):
            self.stem = nnx.Conv(3, c, (2, 2), strides=2, padding="VALID", rngs=rngs)
            self.block, self.narrow = FlaxBlock(c, rngs), nnx.Conv(c, 6, (1, 1), rngs=rngs)
            self.res, self.head = FlaxRes(6, rngs), nnx.Linear(6, 5, rngs=rngs)

        def __call__(self, x):
            return self.head(self.res(self.narrow(self.block(self.stem(x)))).mean((1, 2)))

    torch.manual_seed(0)
    net, port = Net(8).eval(), FlaxNet(8, nnx.Rngs(0))
    for t, f in [(net.stem, port.stem), (net.block.dwconv, port.block.dwconv), (net.res.conv1, port.res.conv1),
                 (net.res.conv2, port.res.conv2), (net.narrow, port.narrow)]:  # fmt: skip
        _conv(t, f)
    _linear(net.block.pw, port.block.pw)
    _linear(net.head, port.head)
    x = torch.randn(2, 3, 12, 12)  # the block: 8 channels at 6x6; the residual block: 6 at 6x6
    report = trace(net, port, x, flax_inputs=(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),))
    assert report.ok and {"block", "res", "res.bn1", "res.conv2"} <= {p.name for p in report.pairs}, str(
        report
    )


def test_a_conv_models_output_permuted_by_the_port_fails():
    """A model whose last convolution gives [batch, vocab, steps] and which returns [batch, steps, vocab]
    (a CTC head): a port returning [batch, vocab, steps] fails at the model (moved back as a convolution's
    output, it passed); a correct one agrees."""
    vocab = 10

    class Torch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.front, self.head = torch.nn.Conv1d(4, 16, 3, padding=1), torch.nn.Conv1d(16, vocab, 1)

        def forward(self, x):
            return self.head(self.front(x)).transpose(1, 2)

    class Flax(nnx.Module):
        def __init__(self, wrong):
            self.front = nnx.Conv(4, 16, (3,), padding=1, rngs=nnx.Rngs(0))
            self.head, self.wrong = nnx.Conv(16, vocab, (1,), rngs=nnx.Rngs(0)), wrong

        def __call__(self, x):
            y = self.head(self.front(x))
            return jnp.swapaxes(y, 1, 2) if self.wrong else y

    torch.manual_seed(0)
    net = Torch().eval()
    x = torch.randn(2, 4, 31)
    flax_x = (jnp.asarray(x.numpy().transpose(0, 2, 1)),)
    for wrong in (False, True):
        port = Flax(wrong)
        _conv(net.front, port.front)
        _conv(net.head, port.head)
        report = trace(net, port, x, flax_inputs=flax_x)
        assert report.ok != wrong and report.first_divergence == ("" if wrong else None), str(report)


def test_a_model_output_is_paired_by_its_own_field_order():
    """A transformers model output without logits (CLIP's: logits_per_image first) gives its first field, as
    its tuple does (return_dict=False) and a port returning that tuple does: it gave its first field in
    sorted order (image_embeds), and the ports failed as of another shape."""
    from transformers.models.clip.modeling_clip import CLIPOutput

    texts = torch.randn(3, 5)

    class Torch(torch.nn.Module):
        def forward(self, x):
            return CLIPOutput(logits_per_image=x @ texts, image_embeds=x[:, :2], text_embeds=texts)

    class Flax(nnx.Module):
        def __call__(self, x):
            return x @ jnp.asarray(texts.numpy()), x[:, :2], texts.numpy()

    report = trace(Torch(), Flax(), torch.randn(4, 3))
    assert report.ok and report.pairs[0].shape == (4, 5), str(report)

    class FlaxDict(nnx.Module):  # the same fields as a dict: paired by key (sorted, it gave image_embeds)
        def __call__(self, x):
            return {"logits_per_image": x @ jnp.asarray(texts.numpy()), "image_embeds": x[:, :2]}

    report = trace(Torch(), FlaxDict(), torch.randn(4, 3))
    assert report.ok and report.pairs[0].shape == (4, 5), str(report)


def test_the_report_as_a_dataframe(made):
    pytest.importorskip("pandas")
    torch_model, flax_model = _pair(made)
    frame = trace(torch_model, flax_model, IDS).to_dataframe()
    assert len(frame) == 29 and {"name", "flax_path", "max_rel", "cosine", "ok", "input_ok"} <= set(
        frame.columns
    )
    assert frame["ok"].all()


def test_the_report_plots(made, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    torch_model, flax_model = _pair(made)
    flax_model.model.layers[0].input_layernorm.eps = 1e-2
    report = trace(torch_model, flax_model, IDS)
    ax = report.plot()
    ax.figure.savefig(tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 1000 and len(ax.patches) == len(report.pairs)


def test_the_cli(made, capsys):
    assert main(["parity", str(made / "f32"), "--tokens", "7"]) == 0
    out = capsys.readouterr().out
    assert "the two models agree" in out and "model.layers.1.mlp.down_proj" in out
    assert main(["parity", str(made / "nf4"), "--keep-quantized"]) == 0
    assert main(["parity", str(made / "f32"), "--model", "checkpoints:BrokenLlama"]) == 1
    assert "first divergence: model.layers.0.input_layernorm" in capsys.readouterr().out


def test_the_built_in_model_runs_in_the_torch_models_dtype(made, tmp_path):
    """A config.json naming no dtype: transformers makes the torch model of the weights' float32, and the
    built-in Flax Llama is compared in float32 too (it ran in bfloat16, with bfloat16's tolerances)."""
    import shutil

    shutil.copytree(made / "f32", tmp_path / "f32")
    config = json.loads((tmp_path / "f32" / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "f32" / "config.json").write_text(json.dumps(config))
    report = qbridge.parity.trace_checkpoint(tmp_path / "f32", tokens=5)
    assert report.ok and {p.dtype for p in report.pairs} == {"float32"}, str(report)
    assert max(p.max_rel for p in report.pairs) < 1e-4


def test_the_cli_names_what_is_wrong(made, tmp_path, capsys):
    """Bad input to `qbridge parity` ends in one line naming the file or the option (exit code 2), before
    transformers reads anything: no directory or config.json, a truncated weight file, no token ids, a
    model path that names nothing."""
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(made / "f32", cut)
    whole = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    for argv, says in (
        ([str(tmp_path / "nothing")], "nothing: no such checkpoint directory"),
        ([str(tmp_path)], f"{tmp_path.name}: no config.json there"),
        ([str(cut / "model.safetensors")], "parity needs the checkpoint's directory"),
        ([str(cut)], "cut/model.safetensors: not a readable safetensors file"),
        ([str(made / "f32"), "--batch", "0"], "batch must be a positive number"),
        ([str(made / "f32"), "--tokens", "-3"], "tokens must be a positive number"),
        # past the model's positions (it ended in a traceback of transformers' mask, or a 40 GB allocation)
        (
            [str(made / "f32"), "--tokens", "100000"],
            "gives the model 128 positions (max_position_embeddings)",
        ),
        ([str(made / "f32"), "--model", "checkpoints:Nope"], "model 'checkpoints:Nope': cannot import it"),
        ([str(made / "f32"), "--model", "nowhere"], "'package.module:Name'"),
        ([str(made / "f32"), "--model", "jax_side:LlamaConfig"], "name an nnx Module class (or factory)"),
        (
            [str(made / "f32"), "--model", "./port.py:Llama"],
            "not a file: run from its directory and give 'port:Llama'",
        ),
        ([str(made / "f32"), "--model", ":Llama"], "name an object by import path"),
    ):
        assert main(["parity", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("qbridge parity: ") and says in err and err.count("\n") == 1, err


def test_a_model_module_in_the_current_directory(made, tmp_path, monkeypatch, capsys):
    """`--model mymodel:Name` finds mymodel.py in the current directory even where it is not on sys.path (the
    installed `qbridge` script, unlike `python -m`, does not put it there), and leaves sys.path as it was."""
    (tmp_path / "port_here.py").write_text(
        "import jax_side\n"
        "def Llama(config, rngs=None):\n"
        "    return jax_side.llama_for_causal_lm(jax_side.LlamaConfig.from_hf(config))\n"
    )
    (tmp_path / "port_buggy.py").write_text("def Llama(config, rngs=None):\n    return 1 + 'a'\n")
    (tmp_path / "port_fails.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "port_class.py").write_text(  # an nnx Module class that takes no rngs
        "from flax import nnx\nclass NoRngs(nnx.Module):\n    def __init__(self, config):\n        pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    assert main(["parity", str(made / "f32"), "--model", "port_here:Llama", "--tokens", "5"]) == 0
    assert "the two models agree" in capsys.readouterr().out and sys.path == before
    with pytest.raises(TypeError, match="unsupported operand"):  # the port's own bug, with its traceback
        main(["parity", str(made / "f32"), "--model", "port_buggy:Llama"])
    assert main(["parity", str(made / "f32"), "--model", "port_fails:Llama"]) == 2
    assert "cannot import it (RuntimeError: boom at import)" in capsys.readouterr().err
    assert main(["parity", str(made / "f32"), "--model", "port_class:NoRngs"]) == 2
    assert "cannot be called as NoRngs(config_dict, rngs=nnx.Rngs(0))" in capsys.readouterr().err


def test_compare_with_infinities_nans_and_integers():
    """The same infinity on both sides (masked logits) agrees and the error is measured on the rest; a NaN
    or an infinity on one side fails; integer outputs are labelled as such and must be equal."""
    from qbridge.parity import compare

    logits = np.array([[0.5, -np.inf, 1.0], [2.0, 3.0, -np.inf]], np.float32)
    near = logits + np.float32(1e-6) * np.isfinite(logits)
    report = compare({"logits": logits}, {"logits": near})
    (out,) = report.outputs
    assert report.ok and 0 < out.max_abs < 2e-6 and out.cosine > 1 - 1e-9, str(report)
    for bad in (np.where(np.isinf(logits), np.float32(-1e9), logits), np.where(logits == 3, np.nan, logits)):
        (out,) = compare(logits, bad).outputs
        assert not out.ok and out.max_abs == float("inf")
    ids = np.array([[3, 1, 4]], np.int64)
    (out,) = compare(ids, ids.copy()).outputs
    assert out.ok and out.dtype == "int64"
    assert not compare(ids, ids + np.array([[0, 0, 1]])).ok  # one token id off: not within any tolerance
    assert not compare(torch.tensor([[True, False]]), np.array([[True, True]])).ok
    big = np.array([2**53 + 1], np.int64)  # equal as float64, not as integers
    (out,) = compare(big, big - 1).outputs
    assert not out.ok and out.max_abs == 1.0
    assert compare(big, big.copy()).ok
    z = np.array([1 + 1j, 2 - 3j], np.complex64)  # complex values: not their real parts alone
    assert compare(z, z.copy()).ok and not compare(z, np.conj(z)).ok
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():
        output = model(IDS)  # a transformers ModelOutput (a dict): its logits, against an array or the same
    assert compare(output, output.logits.numpy()).ok and compare(output, {"logits": output.logits}).ok
    # two named outputs pair by name, also one each (they were paired whatever their names)
    with pytest.raises(ValueError, match=r"outputs differ in structure: \['logits'\] vs \['hidden'\]"):
        compare(output, {"hidden": output.logits})
    assert compare([output.logits], output.logits.numpy()).ok  # one of them a bare array: paired
    # a one-element tuple (a model's output with return_dict=False) against a named output: paired
    assert compare(output, (output.logits,)).ok and compare({"logits": output.logits}, [output.logits]).ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compare_with_masks_filled_with_the_dtypes_minimum(dtype):
    """transformers masks with ``torch.finfo(dtype).min``, a finite value: the same one on both sides agrees
    and is left out of the errors' scale and the cosine, as the same infinity is. Any candidate passed before
    (the scale ~3e38, the cosine swamped by the shared values)."""
    from qbridge.parity import compare

    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.standard_normal((2, 8)).astype(np.float32)).to(dtype)
    lowest = torch.finfo(dtype).min
    ref[:, :4] = lowest
    for cand, ok in [(ref.clone(), True), (-ref, False), (ref * 1.5, False)]:
        cand[:, :4] = lowest
        for pair in [(ref, cand), (ref, cand.float().numpy())]:  # a Flax side in float32 beside it
            (out,) = compare(*pair).outputs
            assert out.ok == ok, (dtype, str(compare(*pair)))
            assert out.max_abs < 10 and (out.cosine > 0.999 if ok else out.max_rel > 0.1)
    cand = ref.clone()
    cand[0, 0] = 0.0  # masked on one side only: fails
    (out,) = compare(ref, cand).outputs
    assert not out.ok and out.max_rel > 0.5
    # each side masks with its own dtype's minimum, or an infinity: masked on both sides alike
    for mask in (np.finfo(np.float32).min, -np.inf):
        port = ref.float().numpy().copy()
        port[:, :4] = mask
        assert compare(ref, port).ok  # a bfloat16 torch output against a float32 port's
        wrong = np.where(np.arange(8) < 4, mask, -port).astype(np.float32)
        (out,) = compare(ref, wrong).outputs
        assert not out.ok and out.max_rel > 0.1  # (the masks swamped the scale: rel 0.004, passed)
    port = ref.float().numpy().copy()
    port[:, :4] = np.inf  # masked with the other sign: not alike
    assert not compare(ref, port).ok


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_trace_finds_a_wrong_module_whose_output_holds_mask_values(dtype):
    """trace compares each module's output with the mask values of its own dtype: a bfloat16 or float16
    module filling masked positions with finfo.min, its other values wrong, fails (its outputs widened to
    float32, the masks swamped the scale, and it passed)."""
    tdt, jdt, rows = getattr(torch, dtype), getattr(jnp, dtype), 6

    class Scores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8)

        def forward(self, x):
            s = self.q(x) @ x.transpose(-1, -2)
            return s.masked_fill(
                torch.triu(torch.ones(rows, rows, dtype=torch.bool), 1), torch.finfo(s.dtype).min
            )

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scores = Scores()

        def forward(self, x):
            return self.scores(x).softmax(-1)

    class FlaxScores(nnx.Module):
        def __init__(self, scale):
            self.q, self.scale = nnx.Linear(8, 8, rngs=nnx.Rngs(1), dtype=jdt, param_dtype=jdt), scale

        def __call__(self, x):
            s = self.scale * (self.q(x) @ jnp.swapaxes(x, -1, -2))
            return jnp.where(jnp.triu(jnp.ones((rows, rows), bool), 1), jnp.finfo(s.dtype).min, s)

    class FlaxModel(nnx.Module):
        def __init__(self, scale):
            self.scores = FlaxScores(scale)

        def __call__(self, x):
            return nnx.softmax(self.scores(x), -1)

    torch.manual_seed(0)
    model = Model().to(tdt).eval()
    x = torch.randn(1, rows, 8).to(tdt)
    for scale, agrees in ((1, True), (3, False)):
        port = FlaxModel(scale)
        port.scores.q.kernel[...] = jnp.asarray(model.scores.q.weight.detach().float().numpy().T, dtype=jdt)
        port.scores.q.bias[...] = jnp.asarray(model.scores.q.bias.detach().float().numpy(), dtype=jdt)
        report = trace(model, port, x, flax_inputs=(jnp.asarray(x.float().numpy(), dtype=jdt),))
        (scores,) = [p for p in report.pairs if p.name == "scores"]
        assert scores.ok == agrees, str(report)
        assert report.first_divergence == (None if agrees else "scores")


def test_dict_outputs_pair_by_name_not_by_order():
    class TorchPair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return {"first": self.a(x), "second": self.b(x)}

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([TorchPair()])

        def forward(self, x):
            out = self.layers[0](x)
            return out["first"] + out["second"]

    class FlaxPair(linen.Module):
        @linen.compact
        def __call__(self, x):
            second = linen.Dense(4, name="b")(x)  # built the other way round
            return {"second": second, "first": linen.Dense(4, name="a")(x)}

    class FlaxNet(linen.Module):
        @linen.compact
        def __call__(self, x):
            out = FlaxPair(name="layers_0")(x)
            return out["first"] + out["second"]

    torch.manual_seed(0)
    net = TorchNet().eval()
    variables = jax_side.to_flax_variables(
        {k: v.detach().numpy() for k, v in net.state_dict().items()}, numbered="underscore"
    )
    report = trace(net, FlaxNet(), torch.randn(3, 4), variables=variables)
    assert report.first_divergence is None and "layers.0" in [p.name for p in report.pairs]


def test_parity_is_reached_from_a_plain_import():
    """The README writes ``qbridge.parity.compare(...)`` after ``import qbridge``."""
    code = "import qbridge; print(qbridge.parity.compare.__name__, qbridge.parity.trace.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["compare", "trace"], out.stderr[-2000:]


def test_nf4_widths_bitsandbytes_cannot_run_on_the_cpu_compare_against_the_exact_decode(
    tmp_path, monkeypatch
):
    """bitsandbytes' CPU 4-bit path fails on some CPUs for an in-dimension that is not a multiple of its
    blocksize (96 and 200 here; it failed on AVX-512 machines and runs on an AVX2 one): parity then compares
    against transformers' model holding the exact decode, and says so, instead of ending in bitsandbytes'
    traceback."""
    from qbridge.parity import trace_checkpoint

    bnb = pytest.importorskip("bitsandbytes")
    sizes = dict(hidden_size=96, intermediate_size=200, num_attention_heads=3, num_key_value_heads=1)
    dense_llama(tmp_path / "dense", sizes=sizes)
    bnb_llama(tmp_path / "dense", tmp_path / "nf4", quant_type="nf4", nested=True)
    note = "could not run the 4-bit torch model on the CPU"
    report = trace_checkpoint(tmp_path / "nf4", tokens=5)  # as this machine's bitsandbytes runs it
    assert report.first_divergence is None, str(report)
    assert report.notes == [] or (len(report.notes) == 1 and note in report.notes[0]), report.notes

    for error in (RuntimeError, AssertionError):  # its matmul raises the first; its weight repacking asserts

        def fails(*args, error=error, **kwargs):  # as bitsandbytes' CPU path fails where it does
            raise error("the CPU 4-bit matmul failed for this shape")

        # every 4-bit layer fails on the way in (on CPUs with AVX-512 BF16 its weight repacking fails before
        # the matmul, so patching the layer, not bnb.matmul_4bit, fails the same way on every CPU)
        monkeypatch.setattr(bnb.nn.Linear4bit, "forward", fails)
        report = trace_checkpoint(tmp_path / "nf4", tokens=5)
        assert report.first_divergence is None, str(report)
        assert len(report.notes) == 1 and note in report.notes[0] and "this shape" in report.notes[0]
        assert error.__name__ in report.notes[0]


def test_an_8bit_checkpoint_compares_against_its_exact_decode_and_says_why(tmp_path):
    """bitsandbytes' 8-bit layers round their inputs to int8 too (LLM.int8()): against them a model of the
    exactly decoded weights diverged by 1.7e-2 and parity reported a FAIL on layers loaded bit for bit.
    The reference is transformers' model holding the exact decode, and the note says why."""
    from qbridge.parity import trace_checkpoint

    pytest.importorskip("bitsandbytes")
    dense_llama(tmp_path / "dense")
    q = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense",
        quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
        dtype=torch.bfloat16,
        device_map="cpu",
    )
    q.save_pretrained(tmp_path / "int8")
    report = trace_checkpoint(tmp_path / "int8", tokens=5)
    assert report.ok and report.first_divergence is None, str(report)
    assert len(report.notes) == 1 and "round their inputs to int8 too (LLM.int8())" in report.notes[0]


ROPES = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.0},
}  # fmt: skip


@pytest.mark.parametrize("rope", ROPES)
def test_rope_scaling_as_transformers_saves_it_agrees_end_to_end(tmp_path, rope):
    """transformers 5 saves rope scaling under rope_parameters (4.x: rope_scaling); before, the Llama read
    neither and ran unscaled rotary embeddings without a word (logits off by 1e-2)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**LLAMA, "rope_theta": 5000.0}, rope_scaling=ROPES[rope])
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "f32")  # float32
    saved = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert (saved.get("rope_parameters") or saved.get("rope_scaling"))["rope_type"] == rope
    c = jax_side.LlamaConfig.from_hf(saved)
    assert (c.rope_type, c.rope_theta) == (rope, 5000.0)
    torch_model, flax_model = _pair(tmp_path)
    report = trace(torch_model, flax_model, IDS)
    assert report.ok and report.first_divergence is None, str(report)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not implemented"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope type 'yarn' is not implemented"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, r"rope type 'dynamic'"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            r"llama3 rope parameters lack low_freq_factor",
        ),
    ],
)
def test_a_config_the_llama_does_not_implement_is_refused(change, error):
    with pytest.raises(ValueError, match=error):
        jax_side.LlamaConfig.from_hf({**LLAMA, **change})


@pytest.mark.parametrize(
    "name, extra",
    [
        ("Granite", dict(embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0)),
        ("SmolLM3", dict(pad_token_id=0)),
        ("Ernie4_5", dict(head_dim=16)),
        ("Qwen2", dict(use_sliding_window=True, sliding_window=4)),
    ],
)
def test_configs_with_llamas_names_that_compute_otherwise_are_refused(name, extra):
    """Each of these loads into the Llama's names; before, each ran as a Llama without a word (logits off
    by 0.95-8.4 in a breaker's 4-layer models)."""
    cls = getattr(transformers, f"{name}Config", None)
    if cls is None:
        pytest.skip(f"this transformers has no {name}")
    config = cls(**{**LLAMA, "num_hidden_layers": 4}, **extra).to_dict()
    with pytest.raises(ValueError, match=r"model_type '\w+' is not one|sliding attention window"):
        jax_side.LlamaConfig.from_hf(config)


@pytest.mark.parametrize("window", [None, 4, 11])
def test_a_mistral_agrees_end_to_end_with_or_without_a_sliding_window(tmp_path, window):
    """Mistral's sliding window (a query sees itself and the window - 1 positions before it) is implemented:
    at 11 tokens a window of 4 masks most of each row (it was refused, Mistral-7B-v0.1's 4096 included, even
    where the window could not matter); and a window over the whole sequence masks nothing more."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(**LLAMA, sliding_window=window)
    transformers.MistralForCausalLM(config).eval().save_pretrained(tmp_path / "f32")
    assert jax_side.LlamaConfig.from_hf(config.to_dict()).sliding_window == window
    torch_model, flax_model = _pair(tmp_path)
    report = trace(torch_model, flax_model, IDS)
    assert report.ok and report.first_divergence is None, str(report)
    if window == 4:  # the window matters here: without it the attention differs
        object.__setattr__(flax_model.model.layers[0].self_attn.config, "sliding_window", None)
        assert trace(torch_model, flax_model, IDS).first_divergence == "model.layers.0.self_attn"


@pytest.mark.parametrize(
    "fields",
    [
        {"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
        {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
         "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    ],
)  # fmt: skip
def test_rope_fields_given_twice_are_read_as_transformers_reads_them(fields):
    ours = jax_side.LlamaConfig.from_hf({**LLAMA, **fields})
    theirs = transformers.LlamaConfig(**{**LLAMA, **fields}).rope_parameters
    assert (ours.rope_type, ours.rope_theta) == (theirs["rope_type"], theirs["rope_theta"])


def test_a_divergence_in_the_model_itself_is_reported_and_plotted(tmp_path):
    """When only the model's own output differs (no submodule pairs up, or the fault is in the model's own
    code), the model, named "" as torch names it, is the first divergence: the report says so (it said
    "the two models agree"), the plot marks it, and the CLI's exit status follows."""

    class Torch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    class Flax(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(16, name="fc2")(linen.relu(linen.Dense(32, name="fc1")(x)))

    torch.manual_seed(0)
    net = Torch().eval()
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    variables = {"params": {"fc1": {"kernel": sd["up.weight"].T, "bias": sd["up.bias"]},
                            "fc2": {"kernel": sd["down.weight"].T * 1.5, "bias": sd["down.bias"]}}}  # fmt: skip
    report = trace(net, Flax(), torch.randn(4, 16), variables=variables)
    assert report.first_divergence == "" and not report.ok
    text = str(report)
    assert "first divergence: (model)" in text and "agree" not in text
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ax = report.plot()
    assert any(t.get_text() == "first divergence" for t in ax.texts)


def test_weights_transformers_cannot_read_are_not_compared_at_random(made, tmp_path, capsys):
    """A checkpoint qbridge reads whole but transformers reads only in part (a torch file holding
    {"state_dict": ...}): transformers leaves those weights at random initial values, so the reference
    becomes the exact decode, with a note naming them (the report blamed the Flax side)."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "wrapped"
    folder.mkdir()
    shutil.copyfile(made / "f32" / "config.json", folder / "config.json")
    torch.save({"state_dict": load_file(made / "f32" / "model.safetensors")}, folder / "pytorch_model.bin")
    assert main(["parity", str(folder), "--tokens", "7"]) == 0
    out = capsys.readouterr().out
    assert "the two models agree" in out
    assert re.search(
        r"note: transformers \S+ left \d+ weight\(s\) of the checkpoint unread, newly initialized", out
    )


def test_the_two_models_given_the_other_way_round_are_named(made):
    torch_model, flax_model = _pair(made)
    with pytest.raises(TypeError, match=r"torch_module must be a torch.nn.Module, got .*other way round"):
        trace(flax_model, torch_model, IDS)


def test_a_weight_the_checkpoint_lacks_is_named_by_the_load(made, tmp_path):
    """transformers' missing keys that the checkpoint does not hold either are the load's error to report
    (the target leaf without a tensor), not a reason to build the reference another way."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qbridge.parity import trace_checkpoint

    folder = tmp_path / "lacking"
    folder.mkdir()
    shutil.copyfile(made / "f32" / "config.json", folder / "config.json")
    state = load_file(made / "f32" / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        jax_side.MatchError, match=r"'model\.layers\.1\.mlp\.up_proj\.kernel' has no checkpoint tensor"
    ):
        trace_checkpoint(folder, tokens=4, batch=1)
