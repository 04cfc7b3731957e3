"""Flax layers whose weights stay quantized (:class:`NF4Weight` / :class:`FP8Weight`): their matmuls run
through :func:`jax_side.quantized_matmul`, which on GPUs decodes each weight tile inside the matmul kernel
(elsewhere, the weight is expanded inside the call), so nothing dense persists between calls. flax.nnx and linen versions of a Dense/Linear and an Embed, plus a helper that swaps the
Linear and Embed modules of an nnx model for them.

The quantized pieces are never differentiated: in nnx they live in :class:`QuantizedVariable` (not a
``Param``, so ``nnx.grad`` leaves them alone), in linen in the ``"quantized"`` collection (not
``"params"``), and the expanded weight passes through ``stop_gradient``. Gradients flow to the inputs,
to biases and to LoRA adapters (``jax_side.add_lora``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._casts import cast_exactly
from ._fused import _held, quantized_matmul, quantized_matmuls
from ._lora import init_lora_a, lora_adapter_class, lora_delta
from ._quantized import FP8Weight, NF4Weight, is_quantized
from ._target import _value
from ._tree import dotted, warn_at_caller


def _flax():
    try:
        from flax import linen, nnx
    except ImportError as e:  # pragma: no cover - flax is an extra
        raise ImportError("the quantized layers need flax: pip install 'qbridge[flax]'") from e
    return nnx, linen


def _dense(x: jax.Array, weight: NF4Weight | FP8Weight, bias: jax.Array | None, dtype: Any) -> jax.Array:
    """``x @ kernel + bias`` as ``nnx.Linear`` computes it, with ``kernel`` the ``[in, out]`` view of ``weight``.

    The product runs through :func:`jax_side.quantized_matmul` (the fused kernel on GPUs, else the weight
    expanded then multiplied); the stored pieces get no gradient.
    """
    weight = jax.lax.stop_gradient(weight)
    dtype = _compute_dtype(x, weight, bias, dtype)
    y = quantized_matmul(x.astype(dtype), weight)
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def _compute_dtype(x: jax.Array, weight: NF4Weight | FP8Weight, bias: jax.Array | None, dtype: Any) -> Any:
    """The dtype ``nnx.Linear`` computes in: ``dtype``, else the promotion of x's, the weight's and the bias'."""
    if dtype is not None:
        return jnp.dtype(dtype)
    wdtype = jnp.dtype(weight.dtype)
    return jnp.result_type(x.dtype, wdtype) if bias is None else jnp.result_type(x.dtype, wdtype, bias.dtype)


_OWN_CALL: dict[str, Any] = {}  # QuantLinear's __call__ as the class defines it


def _make_nnx():
    _flax()  # raises the install hint when flax is missing
    from flax import nnx

    class QuantizedVariable(nnx.Variable):
        """Holds a quantized weight: not a ``Param``, so optimizers and ``nnx.grad`` leave it alone."""

    class QuantLinear(nnx.Module):
        """``nnx.Linear`` over a quantized ``weight`` (torch layout ``[out, in]``; used as the ``[in, out]`` kernel).

        Args:
            weight: an :class:`NF4Weight` or :class:`FP8Weight`.
            bias: float ``[out]`` or None.
            dtype: computation dtype (None: promote input, weight and bias dtypes, as ``nnx.Linear`` does).
            lora: a :class:`LoraConfig` to start with LoRA adapters (see :func:`add_lora`); ``rngs`` initializes them.
        """

        def __init__(
            self,
            weight: Any,
            bias: jax.Array | None = None,
            *,
            dtype: Any = None,
            lora: Any = None,
            rngs: Any = None,
        ):
            if not is_quantized(weight) or len(weight.shape) != 2:
                raise TypeError(
                    f"QuantLinear takes a 2-D NF4Weight or FP8Weight, got {type(weight).__name__}"
                )
            self.weight = QuantizedVariable(weight)
            self.bias = nnx.Param(bias) if bias is not None else None
            self.dtype = dtype
            self.out_features, self.in_features = weight.shape
            self.lora = nnx.data(None)  # LoRA adapters may be set later (jax_side.add_lora)
            if lora is not None:
                self.lora = lora_adapter_class()(
                    self.in_features, self.out_features, lora, rngs=rngs or nnx.Rngs(0)
                )

        def __call__(self, x: jax.Array) -> jax.Array:
            weight = jax.lax.stop_gradient(_value(self.weight))
            return self._finish(x, quantized_matmul(x.astype(self._compute_dtype(x)), weight))

        def _compute_dtype(self, x: jax.Array) -> Any:
            return _compute_dtype(x, _value(self.weight), None if self.bias is None else self.bias[...],
                                  self.dtype)  # fmt: skip

        def _finish(self, x: jax.Array, y: jax.Array) -> jax.Array:
            """``y`` (the product, in the compute dtype) with the bias and LoRA added, as :meth:`__call__`."""
            if self.bias is not None:
                y = y + self.bias[...].astype(y.dtype)
            if self.lora is not None:
                y = y + self.lora(x, y.dtype)
            return y

    class QuantEmbed(nnx.Module):
        """``nnx.Embed`` over a quantized ``[num_embeddings, features]`` table: ``embed(ids)`` gives the rows of
        ``weight.dequantize()`` (the same bits), shape ``ids.shape + (features,)``; ``embed.attend(query)``
        gives ``query @ table.T`` through :func:`quantized_matmul` (tied output layers). As ``nnx.Embed``:
        ids past the table give NaN rows, and a one-row table gives its row for every id. The table is
        decoded at each call; gradients never reach it.

        Args:
            weight: a 2-D :class:`NF4Weight` or :class:`FP8Weight` (positional).
            dtype: the lookups' dtype (None: the weight's ``dtype``): ``weight.dequantize()``'s values, cast.

        Raises:
            TypeError: ``weight`` is not a 2-D quantized weight.
            ValueError: (when called) ids that are not integers.
        """

        def __init__(self, weight: Any, *, dtype: Any = None):
            if not is_quantized(weight) or len(weight.shape) != 2:
                raise TypeError(f"QuantEmbed takes a 2-D NF4Weight or FP8Weight, got {type(weight).__name__}")
            self.weight = QuantizedVariable(weight)
            self.dtype = dtype
            self.num_embeddings, self.features = weight.shape

        def _table(self) -> jax.Array:
            table = jax.lax.stop_gradient(_value(self.weight).dequantize())
            return table if self.dtype is None else cast_exactly(table, self.dtype)

        def __call__(self, ids: jax.Array) -> jax.Array:
            return _lookup(self._table(), _ids(ids, "QuantEmbed"))

        def attend(self, query: jax.Array) -> jax.Array:
            """``query @ table.T`` as ``nnx.Embed.attend`` computes it (tied output layers); ``query`` is
            cast to the table's dtype. Shape ``[..., features]`` -> ``[..., num_embeddings]``."""
            weight = jax.lax.stop_gradient(_value(self.weight))
            dtype = jnp.dtype(weight.dtype if self.dtype is None else self.dtype)
            return quantized_matmul(query.astype(dtype), weight)

    _OWN_CALL["QuantLinear"] = QuantLinear.__call__  # fused_linears groups where __call__ is still this
    return QuantizedVariable, QuantLinear, QuantEmbed


def fused_linears(x: jax.Array, modules: Sequence[Any]) -> tuple[jax.Array, ...]:
    """``tuple(module(x) for module in modules)``, with one kernel launch for the matmuls where the modules
    are kept-quantized ``QuantLinear`` layers that share ``x`` (a layer's q/k/v or gate/up projections; one
    launch where :func:`jax_side.quantized_matmuls` makes one: inside ``jax.jit``, 2 to 128 rows of x).

    The modules stay as they are (their names, parameters, LoRA adapters and biases): the ``QuantLinear``
    modules (not subclasses, whose ``__call__`` may differ) that compute in the same dtype get their products
    from one :func:`jax_side.quantized_matmuls` (on a Hopper GPU, one Mosaic launch for them; each result equal
    to the module's own up to the order of the float32 accumulation), then each adds its bias and LoRA delta
    as its ``__call__`` does. Every other module (dense ``nnx.Linear``, a QuantLinear alone in its dtype) is
    called, and so is every module while ``QuantLinear.__call__`` is replaced (a wrapper that watches each
    module's output, such as ``qbridge.parity``'s trace, sees each call). ``jax_side``'s Llama calls its
    projections through this.

    Raises:
        TypeError: ``modules`` is not a sequence, or holds something that is not callable (kept weights
            themselves go to :func:`jax_side.quantized_matmuls`).
        ValueError: no modules; as ``QuantLinear.__call__`` otherwise.
    """
    if callable(modules) or is_quantized(modules) or not hasattr(modules, "__iter__"):
        raise TypeError(f"fused_linears takes a sequence of modules, got {type(modules).__name__}")
    modules = tuple(modules)
    if not modules:
        raise ValueError("fused_linears takes at least one module")
    for i, m in enumerate(modules):
        # a weight, or an nnx Variable holding one (a kept layer's .weight, which is callable)
        held = is_quantized(_held(m))
        if held or not callable(m):
            hint = " (kept weights themselves: jax_side.quantized_matmuls)" if held else ""
            raise TypeError(f"fused_linears takes modules; modules[{i}] is a {type(m).__name__}{hint}")
    out: list[Any] = [None] * len(modules)
    groups: dict[Any, list[int]] = {}  # compute dtype -> QuantLinear modules (not subclasses) computing in it
    quant_linear = _classes()["QuantLinear"] if len(modules) > 1 else None
    # not where QuantLinear.__call__ was replaced (qbridge.parity's trace wraps it to see each module's output)
    if quant_linear is not None and quant_linear.__call__ is _OWN_CALL["QuantLinear"]:
        for i, m in enumerate(modules):
            if type(m) is quant_linear:
                groups.setdefault(jnp.dtype(m._compute_dtype(x)), []).append(i)
    for dtype, members in groups.items():
        # x that no module takes: each module's own call says so
        if len(members) > 1 and all(x.shape[-1:] == (modules[i].in_features,) for i in members):
            weights = [jax.lax.stop_gradient(_value(modules[i].weight)) for i in members]
            for i, y in zip(members, quantized_matmuls(x.astype(dtype), weights)):
                out[i] = modules[i]._finish(x, y)
    return tuple(m(x) if y is None else y for m, y in zip(modules, out))


def _ids(ids: Any, who: str) -> jax.Array:
    """``ids`` as an integer array, as ``nnx.Embed``/``linen.Embed`` take them.

    Raises:
        ValueError: ids of another dtype (floats, bools), naming the layer (the error type flax raises).
    """
    try:
        ids = jnp.asarray(ids)
    except (TypeError, ValueError):  # None, strings, objects: JAX's message would not name the layer
        raise ValueError(
            f"{who}: ids must be integers (rows of the table), got {type(ids).__name__}"
        ) from None
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{who}: ids must be integers (rows of the table), got {ids.dtype}; cast them with "
                         "ids.astype(jnp.int32) if they hold whole numbers")  # fmt: skip
    return ids


def _lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table``'s rows for ``ids``, shape ``ids.shape + (features,)``, as flax's ``Embed`` gives them: ids past
    the table give NaN rows (``jnp.take``'s fill), and a one-row table gives its row for every id."""
    if table.shape[0] == 1:
        return jnp.broadcast_to(table[0], ids.shape + table.shape[1:])
    return jnp.take(table, ids, axis=0)


def _make_linen():
    _flax()  # raises the install hint when flax is missing
    from flax import linen

    def quantized(module: Any, name: str) -> Any:
        """The quantized weight ``name`` of ``module``'s ``"quantized"`` collection (an error if absent)."""
        weight = module.variable("quantized", name, lambda: None).value
        if not is_quantized(weight):
            raise ValueError(f"{module.name}: no quantized {name!r} in the 'quantized' collection")
        return weight

    class QuantDense(linen.Module):
        """``linen.Dense`` over a quantized weight in the ``"quantized"`` collection, entry ``"kernel"``.

        ``features`` must equal the weight's ``out``; a bias (if ``use_bias``) is a normal param. The weight
        comes with the variables: ``model.apply({"params": ..., "quantized": ...}, x)``. With ``lora`` (a
        :class:`LoraConfig`), LoRA adapters ``lora_A`` / ``lora_B`` live in the ``"lora"`` collection
        (initialized from the ``"params"`` rng, as PEFT initializes them); their dropout needs
        ``deterministic=False`` and a ``"dropout"`` rng while training.
        """

        features: int
        use_bias: bool = False
        dtype: Any = None
        lora: Any = None

        @linen.compact
        def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
            weight = quantized(self, "kernel")
            if weight.shape[0] != self.features:
                raise ValueError(
                    f"{self.name or type(self).__name__}: features={self.features} but the weight has {weight.shape[0]} outputs"
                )
            bias = (
                self.param("bias", linen.initializers.zeros_init(), (self.features,))
                if self.use_bias
                else None
            )
            y = _dense(x, weight, bias, self.dtype)
            if self.lora is not None:
                in_features = weight.shape[1]
                a = self.variable(
                    "lora", "lora_A", lambda: init_lora_a(self.make_rng("params"), in_features, self.lora.r)
                ).value
                b = self.variable(
                    "lora", "lora_B", lambda: jnp.zeros((self.lora.r, self.features), jnp.float32)
                ).value
                want = ((in_features, self.lora.r), (self.lora.r, self.features))
                if (tuple(a.shape), tuple(b.shape)) != want:
                    raise ValueError(
                        f"{self.name or type(self).__name__}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, where "
                        f"LoraConfig(r={self.lora.r}) and the weight [out, in] = {tuple(weight.shape)} need "
                        f"lora_A {want[0]} ([in, r]) and lora_B {want[1]} ([r, out]; PEFT's files hold their "
                        "transposes)"
                    )
                xa = x.astype(a.dtype)
                if self.lora.lora_dropout:
                    xa = linen.Dropout(self.lora.lora_dropout)(xa, deterministic=deterministic)
                y = y + lora_delta(xa, a, b, self.lora.scaling, y.dtype)
            return y

    class QuantEmbedLinen(linen.Module):
        """``linen.Embed`` over a quantized table in the ``"quantized"`` collection, entry ``"embedding"``."""

        dtype: Any = None

        @linen.compact
        def __call__(self, ids: jax.Array) -> jax.Array:
            ids = _ids(ids, self.name or type(self).__name__)
            table = jax.lax.stop_gradient(quantized(self, "embedding").dequantize())
            return _lookup(table if self.dtype is None else cast_exactly(table, self.dtype), ids)

    return QuantDense, QuantEmbedLinen


_CACHE: dict[str, Any] = {}


def _classes() -> dict[str, Any]:
    if not _CACHE:
        var, lin, emb = _make_nnx()
        dense, embed = _make_linen()
        _CACHE.update(
            QuantizedVariable=var, QuantLinear=lin, QuantEmbed=emb, QuantDense=dense, QuantEmbedLinen=embed
        )
    return _CACHE


def __getattr__(name: str) -> Any:  # the classes are built on first use: flax is optional
    if name in ("QuantizedVariable", "QuantLinear", "QuantEmbed", "QuantDense", "QuantEmbedLinen"):
        return _classes()[name]
    raise AttributeError(name)


def _split(
    params: Mapping[Any, Any], prefix: tuple[Any, ...] = ()
) -> tuple[dict[tuple, Any], dict[Any, Any]]:
    """Quantized leaves by path, and the rest of the tree."""
    quantized, rest = {}, {}
    for key, value in params.items():
        if is_quantized(value):
            path = (*prefix, key)
            quantized[path] = value
        elif isinstance(value, Mapping):
            q, r = _split(value, (*prefix, key))
            quantized.update(q)
            if r:
                rest[key] = r
        else:
            rest[key] = value
    return quantized, rest


def _module(model: Any, path: tuple[Any, ...], full: tuple[Any, ...]) -> Any:
    """The submodule at ``path`` (a prefix of the parameter path ``full``), or a ValueError naming the first
    key the model lacks."""
    node = model
    for i, key in enumerate(path):
        try:
            node = node[key] if isinstance(key, int) else getattr(node, key)
        except (AttributeError, KeyError, IndexError, TypeError):
            raise ValueError(_not_the_models(full, i)) from None
    return node


def _not_the_models(path: tuple[Any, ...], i: int) -> str:
    where = dotted(path[:i]) or "its root"
    return (
        f"{dotted(path)}: the model has no key {path[i]!r} ({type(path[i]).__name__}) under {where}; "
        "the parameters must follow the model's own structure, as qbridge.load_checkpoint(path, target=model, "
        "keep_quantized=True) returns them"
    )


def load_quantized_into_nnx(model: Any, params: Mapping[Any, Any], *, dtype: Any = None) -> list[str]:
    """Puts parameters that hold quantized weights into an nnx model.

    Every Linear whose ``kernel`` (or Embed whose ``embedding``) is an :class:`NF4Weight`/:class:`FP8Weight` in
    ``params`` (a pure nested dict, as ``qbridge.load_checkpoint(..., keep_quantized=True, target=model)``
    returns) is swapped, in place, for a :class:`QuantLinear` / :class:`QuantEmbed` (keeping its bias and
    its ``dtype`` unless ``dtype`` is given); everything else is written with ``nnx.update``.

    Returns:
        The dotted paths of the swapped modules.

    Raises:
        TypeError: ``params`` is no mapping; a quantized weight sits where neither a Linear kernel nor an
            Embed table is.
        ValueError: a weight's path does not exist in the model (a bias for a Linear built without one
            included), or its shape differs from the model's (parameters loaded without ``target=model``, or
            for another model). Nothing is changed then.

    Warns:
        UserWarning: ``params`` leave some of the model's parameters (``nnx.Param``, LoRA factors aside) as
            they were, naming them: parameters loaded for a model with fewer layers, say.
    """
    nnx, _ = _flax()
    from flax import traverse_util

    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a nested dict of arrays (as qbridge.load_checkpoint(path, target=model, "
            f"keep_quantized=True) returns), got {type(params).__name__}"
        )
    classes = _classes()
    quantized, rest = _split(params)
    swaps = []  # every new module is made before the model changes, so a refused tree leaves it as it was
    for path, weight in sorted(quantized.items(), key=lambda kv: [str(k) for k in kv[0]]):
        module_path, leaf = path[:-1], path[-1]
        parent, name = _module(model, module_path[:-1], path), module_path[-1]
        old = _module(model, module_path, path)
        if leaf == "kernel" and isinstance(old, nnx.Linear):
            _check_shape(path, tuple(weight.shape), (old.out_features, old.in_features), "[out, in]")
            bias = _get(rest, (*module_path, "bias"))  # the loaded bias, else the module's own
            if bias is not None and getattr(old, "bias", None) is None:
                raise ValueError(
                    f"{dotted((*module_path, 'bias'))}: a bias for a Linear built without one (use_bias=False); "
                    "the parameters must follow the model's own structure, as qbridge.load_checkpoint(path, "
                    "target=model, keep_quantized=True) returns them"
                )
            # checked as the model's other parameters are (below): an array of [out] floats
            if bias is not None:
                if not hasattr(bias, "shape") or not hasattr(bias, "dtype"):
                    raise TypeError(
                        f"{dotted((*module_path, 'bias'))}: the bias must be an array, got {type(bias).__name__}"
                    )
                _check_shape((*module_path, "bias"), tuple(bias.shape), (old.out_features,), "[out]")
                _check_float((*module_path, "bias"), bias.dtype, old.bias[...].dtype)
            if bias is None and getattr(old, "bias", None) is not None:
                bias = old.bias[...]
            new = classes["QuantLinear"](weight, bias, dtype=dtype if dtype is not None else old.dtype)
        elif leaf == "embedding" and isinstance(old, nnx.Embed):
            _check_shape(
                path, tuple(weight.shape), (old.num_embeddings, old.features), "[num_embeddings, features]"
            )
            new = classes["QuantEmbed"](weight, dtype=dtype if dtype is not None else old.dtype)
        elif isinstance(old, (classes["QuantLinear"], classes["QuantEmbed"])):
            raise TypeError(
                f"{dotted(path)}: this module is kept quantized already (an earlier "
                "load_quantized_into_nnx); put new quantized weights into a fresh model, e.g. "
                "jax_side.llama_for_causal_lm(config)"
            )
        else:
            raise TypeError(f"{dotted(path)}: a quantized weight needs an nnx.Linear kernel or nnx.Embed table here, "
                            f"found {type(old).__name__}")  # fmt: skip
        _drop(rest, (*module_path, "bias"))
        swaps.append((parent, name, new, dotted(module_path)))
    leaves = dict(nnx.to_flat_state(nnx.state(model)))
    known = {tuple(path[:i]) for path in leaves for i in range(1, len(path) + 1)}
    for path, value in traverse_util.flatten_dict(rest).items():  # rest: plain nested dicts (_split)
        if path not in known:
            raise ValueError(
                _not_the_models(path, next(i for i in range(len(path)) if path[: i + 1] not in known))
            )
        held = leaves.get(path)
        if held is None:  # known, but as a module's path
            raise ValueError(
                f"{dotted(path)}: a value where the model holds a module; the parameters must follow "
                "the model's own structure, as qbridge.load_checkpoint(path, target=model, keep_quantized=True) "
                "returns them"
            )
        if hasattr(held, "shape"):
            _check_shape(path, tuple(jnp.shape(value)), tuple(held.shape), "as the model holds it")
            _check_float(path, jnp.result_type(value), held.dtype)
    if not swaps:
        warn_at_caller(
            "load_quantized_into_nnx: these parameters hold no kept-quantized weight (loaded without "
            "keep_quantized=True; or the checkpoint's quantized weights are of a kind that loads dense, such as "
            "bitsandbytes 8-bit or torchao; or it quantizes no Linear or Embed): the model was updated dense"
        )
    # the model's parameters these leave as they were (LoRA factors aside: added and trained after loading)
    covered = set(traverse_util.flatten_dict(rest)) | set(quantized) | {(*p[:-1], "bias") for p in quantized}
    untouched = [
        dotted(path)
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if path not in covered and not issubclass(getattr(v, "type", type(v)), nnx.LoRAParam)
    ]
    if untouched:
        warn_at_caller(
            f"load_quantized_into_nnx: the parameters leave {len(untouched)} of the model's parameters as they "
            f"were ({', '.join(untouched[:4])}{', ...' if len(untouched) > 4 else ''}): loaded for a model with "
            "fewer layers or modules? qbridge.load_checkpoint(path, target=model, keep_quantized=True) gives "
            "every parameter of the model"
        )
    nnx.update(model, rest)
    for parent, name, new, _ in swaps:
        if isinstance(name, int):
            parent[name] = new
        else:
            setattr(parent, name, new)
    return [where for *_, where in swaps]


def _check_shape(path: tuple[Any, ...], got: tuple[int, ...], want: tuple[int, ...], layout: str) -> None:
    """Parameters for another model (other widths) are refused before the model changes."""
    if got != want:
        raise ValueError(
            f"{dotted(path)}: shape {got} where the model's is {want} ({layout}): these parameters "
            "were loaded for another model; load them with qbridge.load_checkpoint(path, target=model, "
            "keep_quantized=True) for this one"
        )


def _check_float(path: tuple[Any, ...], got: Any, held: Any) -> None:
    """Integers where the model holds floats are parameters of something else, refused before the model changes."""
    if jnp.issubdtype(held, jnp.inexact) and not jnp.issubdtype(got, jnp.inexact):
        raise ValueError(
            f"{dotted(path)}: {got} values where the model holds {held}: these parameters were not loaded "
            "for this model (load them with qbridge.load_checkpoint(path, target=model, keep_quantized=True))"
        )


def _get(tree: Mapping[Any, Any], path: tuple[Any, ...]) -> Any:
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _drop(tree: dict[Any, Any], path: tuple[Any, ...]) -> None:
    node: Any = tree
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    if isinstance(node, dict):
        node.pop(path[-1], None)
