"""Flax trees from flat checkpoints: name inference, and matching to linen / nnx targets with full reports."""

from __future__ import annotations

import random
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_side

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")


class Block(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(8, 8, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(8, 12, rngs=rngs)
        self.norm = nnx.RMSNorm(8, rngs=rngs)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(10, 8, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(2)])


def _checkpoint(seed: int = 0):
    rng = np.random.default_rng(seed)
    ck = {"embed_tokens.weight": rng.standard_normal((10, 8)).astype(np.float32)}
    for i in range(2):
        ck[f"layers.{i}.q_proj.weight"] = rng.standard_normal((8, 8)).astype(np.float32)
        ck[f"layers.{i}.up.weight"] = rng.standard_normal((12, 8)).astype(np.float32)
        ck[f"layers.{i}.up.bias"] = rng.standard_normal(12).astype(np.float32)
        ck[f"layers.{i}.norm.weight"] = rng.standard_normal(8).astype(np.float32)
    return ck


def test_match_nnx_module():
    m = Model(nnx.Rngs(0))
    ck = _checkpoint()
    tree, report = jax_side.match_to_target(ck, m)
    assert report.ok and len(report.matched) == 9
    assert report.matched["layers.1.up.kernel"] == "layers.1.up.weight"
    nnx.update(m, tree)
    np.testing.assert_array_equal(np.asarray(m.layers[1].q_proj.kernel[...]), ck["layers.1.q_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(m.embed_tokens.embedding[...]), ck["embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(m.layers[0].norm.scale[...]), ck["layers.0.norm.weight"])


def test_match_nnx_state_and_abstract_target():
    ck = _checkpoint()
    state = nnx.state(Model(nnx.Rngs(0)))
    _, report = jax_side.match_to_target(ck, state)
    assert report.ok
    abstract = jax.eval_shape(lambda: nnx.state(Model(nnx.Rngs(0))))  # nothing allocated
    tree2, report2 = jax_side.match_to_target(ck, abstract)
    assert report2.ok
    np.testing.assert_array_equal(np.asarray(tree2["layers"][0]["up"]["kernel"]), ck["layers.0.up.weight"].T)


def test_wrong_checkpoint_reports_every_problem_by_name():
    m = Model(nnx.Rngs(0))
    before = np.asarray(m.layers[0].up.kernel[...]).copy()
    ck = _checkpoint()
    del ck["layers.1.norm.weight"]  # missing
    ck["layers.0.up.weight"] = ck["layers.0.up.weight"][:, :7]  # wrong shape
    ck["layers.0.q_proj.weight"] = ck["layers.0.q_proj.weight"].astype(np.float16)  # wrong dtype
    ck["lm_head.weight"] = np.zeros((10, 8), np.float32)  # unused
    ck["layers.0.norm.num_batches_tracked"] = np.zeros((), np.int64)  # a buffer: skipped, not unused
    with pytest.raises(jax_side.MatchError) as info:
        jax_side.load_into_nnx(m, ck, dtype="checkpoint")
    report = info.value.report
    message = str(info.value)
    assert [leaf for leaf, _ in report.missing] == ["layers.1.norm.scale"]
    assert report.unused == ["lm_head.weight"]
    assert report.skipped == ["layers.0.norm.num_batches_tracked"]
    assert report.shape_mismatches == [("layers.0.up.kernel", "layers.0.up.weight", (8, 12), (7, 12))]
    assert report.dtype_mismatches == [
        ("layers.0.q_proj.kernel", "layers.0.q_proj.weight", "float32", "float16")
    ]
    for needle in ("layers.1.norm.scale", "lm_head.weight", "(8, 12)", "float16", "dtype=None"):
        assert needle in message
    assert message.splitlines()[0] == (  # the counts first, then every problem
        "checkpoint does not match its target (1 target leaf missing, 1 checkpoint tensor unused, "
        "1 shape differs, 1 dtype differs):"
    )
    np.testing.assert_array_equal(np.asarray(m.layers[0].up.kernel[...]), before)  # nothing written
    with pytest.raises(
        jax_side.MatchError
    ) as info:  # by default the float16 leaf is cast, the rest still wrong
        jax_side.load_into_nnx(m, ck)
    assert not info.value.report.dtype_mismatches and len(info.value.report.shape_mismatches) == 1
    assert info.value.report.casts == [
        ("layers.0.q_proj.kernel", "layers.0.q_proj.weight", "float16", "float32")
    ]


def test_non_strict_returns_the_report_and_keeps_target_values():
    """And warns with the report (a user who does not read it would otherwise keep the target's values
    without a word); a strict=False load that fits says nothing."""
    m = Model(nnx.Rngs(0))
    ck = _checkpoint()
    del ck["layers.1.norm.weight"]
    with pytest.warns(
        UserWarning, match=r"(?s)strict=False: the checkpoint does not fit the target.*layers\.1\.norm\.scale"
    ):
        tree, report = jax_side.match_to_target(ck, m, strict=False)
    assert not report.ok and report.missing[0][0] == "layers.1.norm.scale"
    np.testing.assert_array_equal(
        np.asarray(tree["layers"][1]["norm"]["scale"]), np.asarray(m.layers[1].norm.scale[...])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jax_side.match_to_target(_checkpoint(), m, strict=False)[1].ok


def test_dtype_policies():
    m = Model(nnx.Rngs(0))
    ck = {k: v.astype(np.float16) for k, v in _checkpoint().items()}
    ck["layers.0.norm.num_batches_tracked"] = np.zeros((), np.int64)  # not floating: never cast, skipped here
    for dtype in (None, "target"):  # the target's dtypes win, as in torch's load_state_dict
        tree, report = jax_side.match_to_target(ck, m, dtype=dtype)
        assert report.ok and tree["layers"][0]["up"]["kernel"].dtype == jnp.float32
        assert sorted(c[1] for c in report.casts) == sorted(k for k in ck if "num_batches" not in k)
        assert {(c[2], c[3]) for c in report.casts} == {("float16", "float32")}
        assert "cast 9 leaves float16 -> float32" in str(report)
        np.testing.assert_array_equal(
            np.asarray(tree["layers"][0]["up"]["kernel"]), ck["layers.0.up.weight"].T.astype(np.float32)
        )
    with pytest.raises(jax_side.MatchError, match="leave dtype=None to cast"):  # the opt-in strict mode
        jax_side.match_to_target(ck, m, dtype="checkpoint")
    # an integer leaf where a floating tensor belongs: no cast is offered, and dtype=None is not the advice
    ints = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(nnx.state(m))
    )
    ints["layers"][0]["norm"]["scale"] = jax.ShapeDtypeStruct(
        ints["layers"][0]["norm"]["scale"].shape, jnp.int32
    )
    with pytest.raises(
        jax_side.MatchError,
        match=r"'layers\.0\.norm\.scale' is int32, checkpoint 'layers\.0\.norm\.weight' is float16 \(only floating tensors are cast",
    ) as e:
        jax_side.match_to_target(ck, ints)
    assert "leave dtype=None" not in str(e.value)
    ints = {"layers": {0: {"norm": {"num_batches_tracked": jax.ShapeDtypeStruct((), jnp.int32)}}}}
    with pytest.raises(jax_side.MatchError, match=r"integer and bool tensors are not cast"):
        jax_side.match_to_target({"layers.0.norm.num_batches_tracked": np.zeros((), np.int64)}, ints)
    tree, report = jax_side.match_to_target(ck, m, dtype=jnp.bfloat16)
    assert tree["embed_tokens"]["embedding"].dtype == jnp.bfloat16 and {
        (c[2], c[3]) for c in report.casts
    } == {("float16", "bfloat16")}
    same = {k: v.astype(np.float32) for k, v in _checkpoint().items()}
    assert jax_side.match_to_target(same, m)[1].casts == []


def test_integer_leaves_are_never_cast():
    m = Model(nnx.Rngs(0))
    ck = _checkpoint()
    ck["layers.0.up.weight"] = ck["layers.0.up.weight"].astype(np.int32)
    with pytest.raises(jax_side.MatchError) as info:
        jax_side.match_to_target(ck, m)
    assert info.value.report.dtype_mismatches == [
        ("layers.0.up.kernel", "layers.0.up.weight", "float32", "int32")
    ]


def test_non_strict_never_leaves_a_shape_where_a_value_belongs():
    ck = _checkpoint()
    del ck["layers.1.norm.weight"]
    abstract = jax.eval_shape(lambda: nnx.state(Model(nnx.Rngs(0))))
    with pytest.raises(
        jax_side.MatchError,
        match=r"strict=False, but 1 target leaf is.*layers\.1\.norm\.scale.*concrete target",
    ):
        jax_side.match_to_target(ck, abstract, strict=False)
    linen_abstract = {
        "params": jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(nnx.state(Model(nnx.Rngs(0))))
        )
    }
    with pytest.raises(jax_side.MatchError, match=r"layers.1.norm.scale"):
        jax_side.match_to_target(ck, linen_abstract, strict=False)
    concrete = nnx.state(Model(nnx.Rngs(0)))  # a concrete target keeps its own value there
    tree, report = jax_side.match_to_target(ck, concrete, strict=False)
    assert not report.ok and isinstance(tree["layers"][1]["norm"]["scale"], jax.Array)
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def test_rename_and_prefixes():
    m = Model(nnx.Rngs(0))
    ck = {f"model.{k}": v for k, v in _checkpoint().items()}
    _, report = jax_side.match_to_target(ck, m, strict=False)
    assert len(report.missing) == 9 and len(report.unused) == 9
    _, report = jax_side.match_to_target(ck, m, rename={r"^model\.": ""})
    assert report.ok and report.matched["embed_tokens.embedding"] == "model.embed_tokens.weight"
    # rules that match nothing change nothing, and say so (a typo, or a rule for another checkpoint)
    with pytest.warns(UserWarning) as seen:
        _, report = jax_side.match_to_target(
            ck, m, rename={r"^model\.": "", r"^base\.": ""}, kinds={"experts": "linear"}
        )
    assert report.ok
    assert [str(w.message) for w in seen] == [
        "the rename rule '^base\\\\.' matched no checkpoint key; it changed nothing (rules apply in order to each "
        "key; quantization pieces such as .absmax or .weight_scale_inv follow their weight and are not renamed)",
        "the kinds rule 'experts' matched no name; it changed nothing",
    ]
    with pytest.warns(UserWarning, match="the kinds rule 'nowhere' matched no name"):
        jax_side.plan_by_name({"a.weight": ((2, 2), np.float32)}, kinds={"nowhere": "linear"})


def test_linen_variables_with_batch_stats():
    class Net(linen.Module):
        @linen.compact
        def __call__(self, x, train=False):
            x = linen.Conv(4, (3, 3), name="conv")(x)
            return linen.BatchNorm(use_running_average=not train, name="bn")(x)

    variables = Net().init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    rng = np.random.default_rng(1)
    ck = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "bn.weight": rng.standard_normal(4).astype(np.float32),
        "bn.bias": rng.standard_normal(4).astype(np.float32),
        "bn.running_mean": rng.standard_normal(4).astype(np.float32),
        "bn.running_var": rng.random(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(3),
    }
    tree, report = jax_side.match_to_target(ck, variables)
    assert report.ok and report.skipped == ["bn.num_batches_tracked"]
    np.testing.assert_array_equal(np.asarray(tree["batch_stats"]["bn"]["var"]), ck["bn.running_var"])
    np.testing.assert_array_equal(
        np.asarray(tree["params"]["conv"]["kernel"]), ck["conv.weight"].transpose(2, 3, 1, 0)
    )
    by_name = jax_side.to_flax_variables(ck)
    assert set(by_name) == {"params", "batch_stats"}
    np.testing.assert_array_equal(np.asarray(by_name["batch_stats"]["bn"]["mean"]), ck["bn.running_mean"])


def test_name_inference():
    assert jax_side.infer_kind("model.embed_tokens.weight", 2) == "embedding"
    assert jax_side.infer_kind("transformer.wte.weight", 2) == "embedding"
    assert jax_side.infer_kind("bert.embeddings.word_embeddings.weight", 2) == "embedding"
    assert jax_side.infer_kind("model.layers.0.mlp.down_proj.weight", 2) == "linear"
    assert jax_side.infer_kind("model.norm.weight", 1) == "layernorm"
    assert jax_side.infer_kind("features.0.weight", 4) == "conv2d"
    assert jax_side.infer_kind("bn.running_var", 1) == "batchnorm"
    assert jax_side.infer_kind("A_log", 2) == "param"
    assert jax_side.infer_kind("up.0.weight", 4, {r"^up\.": "conv_transpose2d"}) == "conv_transpose2d"
    v = jax_side.to_flax_variables({"model.layers.0.mlp.down_proj.weight": np.ones((3, 5))}, numbered="int")
    assert v["params"]["model"]["layers"][0]["mlp"]["down_proj"]["kernel"].shape == (5, 3)
    sequential = {
        "0.weight": np.ones((8, 4)),
        "0.bias": np.ones(8),
        "2.weight": np.ones((2, 8)),
    }  # nn.Sequential
    for numbered, names in (("keep", ["0", "2"]), ("int", [0, 2]), ("underscore", ["0", "2"])):
        v = jax_side.to_flax_variables(sequential, numbered=numbered)
        assert list(v["params"]) == names and v["params"][names[1]]["kernel"].shape == (8, 2)


def test_key_candidates():
    assert jax_side.torch_key_candidates(("layers_0", "attn", "kernel")) == [
        "layers_0.attn.weight", "layers_0.attn.kernel", "layers.0.attn.weight", "layers.0.attn.kernel",
    ]  # fmt: skip


def test_bad_target():
    with pytest.raises(TypeError, match="target must be"):
        jax_side.match_to_target({}, [1, 2])


def test_a_refusal_counts_its_problems_in_words_that_agree_with_the_count():
    report = jax_side.MatchReport(
        missing=[("a.kernel", ["a.weight"]), ("b.kernel", ["b.weight"])],
        unused=["x.weight"],
        shape_mismatches=[("c.kernel", "c.weight", (2, 3), (3, 2)), ("d.kernel", "d.weight", (4,), (5,))],
        dtype_mismatches=[("e.kernel", "e.weight", "float32", "float16")],
    )
    assert str(report).splitlines()[0] == (
        "checkpoint does not match its target (2 target leaves missing, 1 checkpoint tensor unused, "
        "2 shapes differ, 1 dtype differs):"
    )


def test_a_target_of_another_configuration_is_named_as_the_likely_cause():
    """Numbered blocks on one side only, or several leaves of other sizes, point at a target built from
    another configuration than the checkpoint's; a single mismatch, or a transposed kernel (which has a
    hint of its own), does not."""
    matched = {f"layers.{i}.q.kernel": f"layers.{i}.q.weight" for i in range(2)}
    fewer = jax_side.MatchReport(unused=["layers.2.q.weight", "layers.3.q.weight", "layers.3.experts.7.w"],
                                 matched=matched)  # fmt: skip
    assert fewer.config_hints() == [
        "the checkpoint has blocks numbered up to 3 and the target up to 1: the target has fewer layers than the "
        "checkpoint; build it from the checkpoint's own config.json (if the target was built from it, the "
        "config.json does not describe these files: qbridge's inspect_checkpoint compares them)"
    ]
    assert f"  ({fewer.config_hints()[0]})" in str(fewer).splitlines()
    more = jax_side.MatchReport(missing=[("layers.4.q.kernel", ["layers.4.q.weight"])], matched=matched)
    assert more.config_hints() == [
        "the target has blocks numbered up to 4 and the checkpoint up to 1: the target has more layers than the "
        "checkpoint; build it from the checkpoint's own config.json (if the target was built from it, the "
        "config.json does not describe these files: qbridge's inspect_checkpoint compares them)"
    ]
    sizes = [("a.kernel", "a.weight", (2, 3), (2, 4)), ("b.kernel", "b.weight", (3,), (4,))]
    assert "2 leaves differ in shape" in jax_side.MatchReport(shape_mismatches=sizes).config_hints()[0]
    assert jax_side.MatchReport(shape_mismatches=sizes[:1]).config_hints() == []
    transposed = jax_side.MatchReport(shape_mismatches=sizes, hints={"a.kernel": " (its transpose)"})
    assert transposed.config_hints() == []
    # a leftover inside the target's own range of blocks (a stray tensor) is not called a missing layer
    assert jax_side.MatchReport(unused=["layers.1.extra.weight"], matched=matched).config_hints() == []


def test_a_plan_decides_each_tensor_as_it_would_alone():
    """plan_by_name decides tensors that share a module name, a tensor name and a shape once for all of them:
    every tensor must still get what it would get planned alone, whatever its torch kind, rank, shape and
    module (an embedding's, a norm's, a buffer's name, GPT-2's 4-D attention mask), in any order."""
    modules = ["embed_tokens", "down_proj", "norm", "attn", "wte", "experts"]
    names = ["weight", "bias", "running_mean", "inv_freq", "A_log"]
    shapes = [(4,), (3, 5), (5, 3), (2, 3, 4, 5), (6, 2, 3)]
    kinds = [None, "linear", "embedding", "param", "stacked_linear", "conv2d"]
    ranks = {"stacked_linear": 3, "conv2d": 4, "linear": 2, "embedding": 2}  # a torch kind's weights' rank
    combos = [
        (module, name, shape, kind)
        for module in modules
        for name in names
        for shape in shapes
        for kind in kinds
        if kind is None or (name == "weight" and len(shape) == ranks.get(kind, len(shape)))
    ]
    rng = np.random.default_rng(5)
    checkpoint, torch_kinds, optional = {}, {}, {}
    for layer, i in enumerate(rng.permutation(2 * len(combos)) % len(combos)):  # each combination twice
        module, name, shape, kind = combos[i]
        key = f"model.layers.{layer}.{module}.{name}"
        checkpoint[key] = (shape, np.dtype(np.float32))
        if kind is not None:
            torch_kinds[key] = kind
        if rng.random() < 0.05:
            optional[key] = "a tied copy"
    plan, skipped = jax_side.plan_by_name(checkpoint, torch_kinds=torch_kinds, optional=optional)
    alone_plan, alone_skipped = [], {}
    for key, value in checkpoint.items():
        p, s = jax_side.plan_by_name(
            {key: value},
            torch_kinds={key: torch_kinds[key]} if key in torch_kinds else None,
            optional={key: optional[key]} if key in optional else None,
        )
        alone_plan += p
        alone_skipped.update(s)
    assert plan == alone_plan
    assert skipped == alone_skipped
    assert len(plan) > 300 and len(skipped) > 60  # both outcomes, and the buffer reasons among them
    # a kinds= pattern that names some layers' modules only: each tensor still as alone
    kinds = {r"^model\.layers\.1\d*\.(down_proj|norm|attn)$": "param"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rule for a module no checkpoint key has: warned about
        together = jax_side.plan_by_name(checkpoint, kinds=kinds, torch_kinds=torch_kinds, optional=optional)
        alone = [
            jax_side.plan_by_name(
                {key: value},
                kinds=kinds,
                torch_kinds={key: torch_kinds[key]} if key in torch_kinds else None,
                optional={key: optional[key]} if key in optional else None,
            )
            for key, value in checkpoint.items()
        ]
    assert together[0] == [p for a in alone for p in a[0]]
    assert together[0] != plan  # the pattern changed some
    # renamed modules (an attention's mask buffer is told by its module's own name, before renaming)
    rename = {r"\.attn\.": ".norm."}
    together = jax_side.plan_by_name(checkpoint, rename=rename, torch_kinds=torch_kinds, optional=optional)
    alone_plan, alone_skipped = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rule changes no other module's key: warned about
        for key, value in checkpoint.items():
            p, s = jax_side.plan_by_name(
                {key: value},
                rename=rename,
                torch_kinds={key: torch_kinds[key]} if key in torch_kinds else None,
                optional={key: optional[key]} if key in optional else None,
            )
            alone_plan += p
            alone_skipped.update(s)
    assert together == (alone_plan, alone_skipped)
    assert "causal-mask buffer" in together[1].values()
    # dimensions as given (numpy integers, 0-d arrays: unhashable), each tensor's own, whatever came before
    mixed = {
        "a.0.proj.weight": ((3, 4), np.float32),
        "a.1.proj.weight": ((np.int64(3), np.int64(4)), np.float32),
        "a.2.proj.weight": ((np.array(3), np.array(4)), np.float32),
    }
    shapes = [p.leaf.shape for p in jax_side.plan_by_name(mixed)[0]]
    assert [[type(d) for d in shape] for shape in shapes] == [[int, int], [np.int64] * 2, [np.ndarray] * 2]
    assert all(tuple(map(int, shape)) == (4, 3) for shape in shapes)
    # two problems at once: the leaf named twice is said first, naming both keys
    with pytest.raises(ValueError, match=r"'a\.proj\.weight' and 'a\.proj\.weight\.' both map"):
        jax_side.plan_by_name(
            {"a.proj.weight": ((2, 3), np.float32), "a.proj.weight.": ((2, 3, 4), np.float32)},
            torch_kinds={"a.proj.weight": "linear"},
        )


def test_the_joined_check_for_a_dot_at_a_keys_end_answers_as_each_key_would():
    """``plan_by_name`` asks whether any key starts or ends with "." of the keys joined by NUL: keys holding
    NUL or dots anywhere, alone or together, get the answer of asking each key."""
    from jax_side._tree import _dot_at_an_end

    rng = random.Random(11)
    for _ in range(3000):
        keys = [
            "".join(rng.choice("a.\0") for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(0, 4))
        ]
        each = any(k.startswith(".") or k.endswith(".") for k in keys)
        assert _dot_at_an_end(keys) == each or (not each and any("\0" in k for k in keys)), keys


@pytest.mark.parametrize("rename", [None, {"^a": "b"}])
@pytest.mark.parametrize("bad", [1, b"a.weight", ("a", "weight"), None])
def test_a_key_that_is_no_string_is_named(bad, rename):
    shapes = {"a.weight": ((2, 3), np.float32), bad: ((2, 3), np.float32)}
    with pytest.raises(
        TypeError,
        match=rf"checkpoint keys are torch state-dict names \(strings\), got {re.escape(repr(bad))}",
    ):
        jax_side.plan_by_name(shapes, rename=rename)
