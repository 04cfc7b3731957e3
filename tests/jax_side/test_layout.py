"""Layout rules checked against real modules: a torch module and the Flax module with converted parameters
compute the same outputs on the same input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_side

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """GPU matmuls default to TF32-like precision; compare against torch's float32 at full precision."""
    with jax.default_matmul_precision("highest"):
        yield


def _state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _load(flax_module, torch_module, **kwargs):
    report = jax_side.load_into_nnx(flax_module, _state(torch_module), **kwargs)
    assert report.ok, str(report)
    return report


def _channels_last(x: torch.Tensor) -> np.ndarray:
    return np.moveaxis(x.numpy(), 1, -1)


def _run(torch_module, x):
    torch_module.eval()
    with torch.no_grad():
        return torch_module(x)


def test_linear():
    tm = torch.nn.Linear(5, 7)
    fm = nnx.Linear(5, 7, rngs=nnx.Rngs(0))
    _load(fm, tm)
    x = torch.randn(3, 5)
    np.testing.assert_allclose(np.asarray(fm(jnp.asarray(x.numpy()))), _run(tm, x).numpy(), **TOL)


def test_square_linear_is_transposed_whatever_the_shapes():
    tm = torch.nn.Linear(6, 6, bias=False)
    fm = nnx.Linear(6, 6, use_bias=False, rngs=nnx.Rngs(0))
    _load(fm, tm)
    np.testing.assert_array_equal(np.asarray(fm.kernel[...]), tm.weight.detach().numpy().T)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv(nd, groups):
    k = (3, 2, 2)[:nd]
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[nd]
    tm = conv(4, 6, k, stride=2, padding=1, groups=groups)
    fm = nnx.Conv(4, 6, k, strides=2, padding=[(1, 1)] * nd, feature_group_count=groups, rngs=nnx.Rngs(0))
    _load(fm, tm)
    x = torch.randn(2, 4, *([7] * nd))
    np.testing.assert_allclose(
        np.asarray(fm(jnp.asarray(_channels_last(x)))), _channels_last(_run(tm, x)), **TOL
    )


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_transpose(nd):
    k = (3, 3, 2)[:nd]
    conv = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}[nd]
    p = 1
    tm = conv(4, 5, k, stride=2, padding=p)
    # torch's padding p is Flax's dilation * (k - 1) - p on each side
    fm = nnx.ConvTranspose(
        4, 5, k, strides=2, padding=[(kk - 1 - p, kk - 1 - p) for kk in k], rngs=nnx.Rngs(0)
    )
    _load(fm, tm)  # the nnx module type tells ConvTranspose from Conv
    x = torch.randn(2, 4, *([5] * nd))
    np.testing.assert_allclose(
        np.asarray(fm(jnp.asarray(_channels_last(x)))), _channels_last(_run(tm, x)), **TOL
    )


def test_a_subclass_of_a_flax_layer_is_laid_out_as_that_layer():
    """class Upsample(nnx.ConvTranspose) inherits its layout; before, its unknown type name fell back to the
    name rules, which read a 4-D kernel as a Conv (no flip, in/out swapped: wrong values for square ones)."""

    class Upsample(nnx.ConvTranspose):
        pass

    tm = torch.nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)
    fm = Upsample(4, 4, (3, 3), strides=2, padding=[(1, 1), (1, 1)], rngs=nnx.Rngs(0))
    _load(fm, tm)
    x = torch.randn(1, 4, 5, 5)
    np.testing.assert_allclose(
        np.asarray(fm(jnp.asarray(_channels_last(x)))), _channels_last(_run(tm, x)), **TOL
    )


def test_conv_transpose_by_name_needs_an_override():
    tm = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 4, 3))
    fm = nnx.ConvTranspose(3, 4, (3, 3), padding="VALID", rngs=nnx.Rngs(0))
    variables = jax_side.to_flax_variables(_state(tm), kinds={r"^0$": "conv_transpose2d"})
    nnx.update(fm, variables["params"]["0"])
    x = torch.randn(1, 3, 6, 6)
    np.testing.assert_allclose(
        np.asarray(fm(jnp.asarray(_channels_last(x)))), _channels_last(_run(tm, x)), **TOL
    )


def test_embedding():
    tm = torch.nn.Embedding(11, 6)
    fm = nnx.Embed(11, 6, rngs=nnx.Rngs(0))
    _load(fm, tm)
    ids = torch.randint(0, 11, (4, 3))
    np.testing.assert_array_equal(np.asarray(fm(jnp.asarray(ids.numpy()))), _run(tm, ids).numpy())


@pytest.mark.parametrize(
    "make",
    [
        lambda: (torch.nn.LayerNorm(8, eps=1e-5), nnx.LayerNorm(8, epsilon=1e-5, rngs=nnx.Rngs(0))),
        lambda: (torch.nn.RMSNorm(8, eps=1e-6), nnx.RMSNorm(8, epsilon=1e-6, rngs=nnx.Rngs(0))),
        lambda: (
            torch.nn.GroupNorm(2, 8, eps=1e-5),
            nnx.GroupNorm(8, num_groups=2, epsilon=1e-5, rngs=nnx.Rngs(0)),
        ),
    ],
)
def test_norms(make):
    tm, fm = make()
    with torch.no_grad():
        for p in tm.parameters():
            p.copy_(torch.randn_like(p))
    _load(fm, tm)
    x = torch.randn(3, 8)
    np.testing.assert_allclose(np.asarray(fm(jnp.asarray(x.numpy()))), _run(tm, x).numpy(), **TOL)


def test_batchnorm_with_running_stats():
    tm = torch.nn.BatchNorm2d(6, eps=1e-5)
    tm.train()
    for _ in range(3):
        tm(torch.randn(4, 6, 5, 5) * 3 + 1)  # move the running statistics away from 0 / 1
    with torch.no_grad():
        tm.weight.copy_(torch.randn(6))
        tm.bias.copy_(torch.randn(6))
    fm = nnx.BatchNorm(6, use_running_average=True, epsilon=1e-5, rngs=nnx.Rngs(0))
    report = _load(fm, tm)
    assert report.skipped == ["num_batches_tracked"]
    x = torch.randn(2, 6, 4, 4)
    np.testing.assert_allclose(
        np.asarray(fm(jnp.asarray(_channels_last(x)))), _channels_last(_run(tm, x)), **TOL
    )


class _TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(20, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 20, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(self.norm(h))


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(20, 16, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(16, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(16, 20, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = nnx.relu(layer(h))
        return self.head(self.norm(h))


class _LinenNet(linen.Module):
    @linen.compact
    def __call__(self, ids):
        h = linen.Embed(20, 16, name="embed_tokens")(ids)
        for i in range(2):
            h = linen.relu(linen.Dense(16, name=f"layers_{i}")(h))
        h = linen.LayerNorm(epsilon=1e-5, name="norm")(h)
        return linen.Dense(20, use_bias=False, name="head")(h)


def test_small_nnx_model():
    torch.manual_seed(0)
    tm = _TorchNet()
    fm = _NnxNet(nnx.Rngs(1))
    _load(fm, tm)
    ids = torch.randint(0, 20, (2, 5))
    np.testing.assert_allclose(np.asarray(fm(jnp.asarray(ids.numpy()))), _run(tm, ids).numpy(), **TOL)


def test_small_linen_model_by_target_and_by_name():
    torch.manual_seed(0)
    tm = _TorchNet()
    ids = torch.randint(0, 20, (2, 5))
    want = _run(tm, ids).numpy()
    model = _LinenNet()
    target = model.init(__import__("jax").random.key(0), jnp.asarray(ids.numpy()))
    params, report = jax_side.match_to_target(_state(tm), target)
    assert report.ok and set(params) == {"params"}
    np.testing.assert_allclose(np.asarray(model.apply(params, jnp.asarray(ids.numpy()))), want, **TOL)
    by_name = jax_side.to_flax_variables(_state(tm), numbered="underscore")
    np.testing.assert_allclose(np.asarray(model.apply(by_name, jnp.asarray(ids.numpy()))), want, **TOL)


def test_dtype_policy():
    tm = torch.nn.Linear(4, 3).to(torch.float64)
    state = _state(tm)
    v = jax_side.to_flax_variables(state, dtype=jnp.bfloat16)
    assert v["params"]["kernel"].dtype == jnp.bfloat16
    kept = jax_side.to_flax_variables({"w.weight": np.ones((3, 4), np.float16)})
    assert kept["params"]["w"]["kernel"].dtype == jnp.float16


def test_rules_as_data():
    rule = jax_side.rule_for("conv2d", "weight")
    assert (rule.flax_name, rule.perm) == ("kernel", (2, 3, 1, 0))
    assert jax_side.flax_shape(rule, (8, 4, 3, 5)) == (3, 5, 4, 8)
    assert jax_side.rule_for("batchnorm", "running_var").collection == "batch_stats"
    assert jax_side.rule_for("embedding", "weight").perm is None
    assert jax_side.rule_for("conv_transpose1d", "weight").flip == (0,)
    with pytest.raises(ValueError, match="unknown module kind"):
        jax_side.rule_for("lstm", "weight")


def test_a_rule_for_another_rank_is_refused_not_skipped():
    """A Linear's rule on a 3-D array (or a convolution's on a 2-D one) returned the array as it was."""
    linear = jax_side.rule_for("linear", "weight")
    with pytest.raises(ValueError, match=r"rule for 'kernel' lays out arrays of rank 2, got rank 3"):
        jax_side.apply_rule(np.ones((2, 3, 4)), linear)
    with pytest.raises(ValueError, match=r"rank 2, got rank 3"):
        jax_side.flax_shape(linear, (2, 3, 4))
    with pytest.raises(ValueError, match=r"rank 3, got rank 2"):
        jax_side.apply_rule(np.ones((3, 4)), jax_side.rule_for("stacked_linear", "weight"))
    with pytest.raises(ValueError, match=r"rank 4, got rank 3"):
        jax_side.apply_rule(np.ones((2, 3, 4)), jax_side.rule_for("conv2d", "weight"))
    assert jax_side.apply_rule(np.ones((3, 4)), linear).shape == (4, 3)
    assert jax_side.flax_shape(jax_side.rule_for("layernorm", "weight"), (7,)) == (7,)


def test_a_kernel_of_no_layer_rank_is_a_plain_parameter():
    """A "kernel" of rank 0, 1 or 6 was read as 'conv-2d', 'conv-1d', 'conv4d' (no such kinds)."""
    for ndim in (0, 1, 6):
        assert jax_side.kind_of_flax_leaf("kernel", ndim) == "param"
        assert jax_side.rule_for_flax_leaf("kernel", ndim).perm is None
    assert [jax_side.kind_of_flax_leaf("kernel", n) for n in (2, 3, 4, 5)] == [
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
    ]


def test_apply_rule_refuses_a_torch_tensor_by_name():
    with pytest.raises(TypeError, match=r"x is a torch tensor.*qbridge\.to_jax"):
        jax_side.apply_rule(torch.ones(2, 3, dtype=torch.bfloat16), jax_side.rule_for("linear", "weight"))
    with pytest.raises(TypeError, match=r"x is a torch tensor"):
        jax_side.apply_rule(torch.ones(2, 3), jax_side.rule_for("linear", "weight"))
