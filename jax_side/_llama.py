"""A Llama-style decoder in flax.nnx whose module tree mirrors transformers' ``LlamaForCausalLM``.

Leaf paths are the torch names with Flax leaf names (``model.layers.0.self_attn.q_proj.kernel`` for
``model.layers.0.self_attn.q_proj.weight``), so a checkpoint written by transformers loads into it by
target matching. The arithmetic follows transformers' eager implementation: RMSNorm in float32 and cast
back before the scale, rotary embeddings computed in float32, softmax in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ._qlayers import fused_linears
from ._quantized import explicit_axes, explicit_mesh, with_auto_axes
from ._target import _value


def _set(var: Any, value: Any) -> None:
    """Sets an nnx Variable's value (``set_value``: flax deprecates ``.value``, which flax 0.11 only has; read
    with ``_target._value``)."""
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


def _nnx():
    try:
        from flax import nnx
    except ImportError as e:  # pragma: no cover - flax is an extra
        raise ImportError("the Flax Llama model needs flax: pip install 'qbridge[flax]'") from e
    return nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a transformers ``LlamaConfig`` that the model uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default", "linear" or "llama3" (transformers' rope_parameters/rope_scaling)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position_embeddings: int = 8192  # llama3 only
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Mistral's sliding attention window: a query attends to itself and the sliding_window - 1 positions
    # before it (transformers' sliding-window causal mask); None: the whole sequence before it
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not implemented by jax_side's Llama (it implements "
                f"{', '.join(ROPE_TYPES)})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not implemented by jax_side's Llama (silu)")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"sliding_window must be a positive number of positions or None, got {window!r}")

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads, ``num_key_value_heads`` (``num_attention_heads`` when unset)."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """The size of one attention head, ``head_dim`` (``hidden_size // num_attention_heads`` when unset)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """From a transformers ``config.json`` mapping (or ``LlamaConfig.to_dict()``).

        Rotary scaling is read from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5):
        ``linear`` and ``llama3`` (Llama 3.1 and later) are implemented as transformers computes them.

        Raises:
            ValueError: a rope type or activation this model does not implement, a sliding attention window
                outside a Mistral config (Qwen2's ``use_sliding_window``; Mistral's is implemented), a
                ``model_type`` other than ``llama`` or ``mistral`` (architectures with Llama's names that
                compute otherwise), or a config without a Llama's sizes (another architecture:
                ``model_type`` named).
        """
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in config]
        if missing:
            kind = config.get("model_type")
            raise ValueError(
                f"the config{f' (model_type {kind!r})' if kind else ''} has no {', '.join(missing)}: jax_side's "
                "Llama takes Llama-like configs; give another architecture a target of its own"
            )
        kind = config.get("model_type")
        if kind not in (None, *MODEL_TYPES):
            raise ValueError(
                f"model_type {kind!r} is not one jax_side's Llama implements ({', '.join(MODEL_TYPES)}): models "
                "that share Llama's names compute otherwise (multipliers, layers without rotary embeddings, "
                "interleaved rotary); give it a target of its own"
            )
        if (config.get("sliding_window") is not None and kind != "mistral") or config.get(
            "use_sliding_window"
        ):
            raise ValueError(
                f"a sliding attention window ({config.get('sliding_window')}) outside a Mistral config is not "
                "implemented by jax_side's Llama"
            )
        # as transformers 5 reads it: a 4.x rope_scaling replaces rope_parameters, whose rope_theta wins over
        # the top-level one
        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type")) or "default"
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_kwargs: dict[str, Any] = {"rope_type": str(rope_type), "rope_theta": float(theta)}
        needed = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor"]}
        absent = [k for k in needed.get(rope_type, []) if k not in rope]
        if absent:
            raise ValueError(f"the config's {rope_type} rope parameters lack {', '.join(absent)}")
        if rope_type in ("linear", "llama3"):
            rope_kwargs["rope_factor"] = float(rope["factor"])
        if rope_type == "llama3":
            rope_kwargs.update(
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings", config.get("max_position_embeddings", 8192))
                ),
            )
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("a partial_rotary_factor is not implemented by jax_side's Llama")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names and k not in rope_kwargs}
        return cls(**rope_kwargs, **kwargs)


ROPE_TYPES = ("default", "linear", "llama3")
MODEL_TYPES = ("llama", "mistral")  # transformers' model_type values computed as this model computes


def _inv_freq(c: LlamaConfig) -> jax.Array:
    """The rotary inverse frequencies of ``c``, as transformers' ``ROPE_INIT_FUNCTIONS`` compute them (in
    float32): default; ``linear`` divides them by the factor; ``llama3`` divides the low frequencies by it
    and interpolates between the two in the middle band."""
    dim = c.head_size
    inv_freq = 1.0 / (c.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if c.rope_type == "linear":
        return inv_freq / c.rope_factor
    if c.rope_type == "llama3":
        old = c.rope_original_max_position_embeddings
        low_wavelen, high_wavelen = old / c.rope_low_freq_factor, old / c.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / c.rope_factor, inv_freq)
        smooth = (old / wavelen - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def _rotary(positions: jax.Array, c: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    inv_freq = _inv_freq(c)
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _repeat_heads(x: jax.Array, groups: int) -> jax.Array:
    """``(batch, kv_heads, seq, head_size)`` -> ``(batch, kv_heads * groups, seq, head_size)``, each key/value
    head repeated ``groups`` times in place (transformers' ``repeat_kv``)."""
    return jnp.repeat(x, groups, axis=1) if groups > 1 else x


def _logits_spec(input_ids: jax.Array) -> P:
    """The logits' PartitionSpec: the ids' on their axes, the vocabulary whole."""
    spec = tuple(getattr(jax.typeof(input_ids).sharding, "spec", ())) + (None,) * jnp.ndim(input_ids)
    return P(*spec[: jnp.ndim(input_ids)], None)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _make_modules():
    _nnx()  # raises the install hint when flax is missing
    from flax import nnx

    class LlamaRMSNorm(nnx.Module):
        def __init__(self, size: int, eps: float, *, param_dtype: Any):
            self.scale = nnx.Param(jnp.ones((size,), param_dtype))
            self.eps = eps

        def __call__(self, x: jax.Array) -> jax.Array:
            h = x.astype(jnp.float32)
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
            return self.scale[...] * h.astype(x.dtype)

    class LlamaAttention(nnx.Module):
        def __init__(self, c: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: Any):
            kw = dict(use_bias=c.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.config = c
            self.q_proj = nnx.Linear(c.hidden_size, c.num_attention_heads * c.head_size, **kw)
            self.k_proj = nnx.Linear(c.hidden_size, c.kv_heads * c.head_size, **kw)
            self.v_proj = nnx.Linear(c.hidden_size, c.kv_heads * c.head_size, **kw)
            self.o_proj = nnx.Linear(c.num_attention_heads * c.head_size, c.hidden_size, **kw)

        def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
            c = self.config
            b, s, _ = h.shape
            # kept-quantized projections: one kernel launch for the three (fused_linears)
            q, k, v = fused_linears(h, (self.q_proj, self.k_proj, self.v_proj))
            q = q.reshape(b, s, c.num_attention_heads, c.head_size).transpose(0, 2, 1, 3)
            k = k.reshape(b, s, c.kv_heads, c.head_size).transpose(0, 2, 1, 3)
            v = v.reshape(b, s, c.kv_heads, c.head_size).transpose(0, 2, 1, 3)
            cos, sin = cos.astype(q.dtype)[None, None], sin.astype(q.dtype)[None, None]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            groups = c.num_attention_heads // c.kv_heads
            k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
            scores = (q @ k.transpose(0, 1, 3, 2)) * (c.head_size**-0.5)
            causal = jnp.tril(jnp.ones((s, s), dtype=bool))
            if c.sliding_window is not None and c.sliding_window < s:  # keys within the window before it
                causal = jnp.triu(causal, 1 - c.sliding_window)
            scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
            weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
            out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, s, c.num_attention_heads * c.head_size)
            return self.o_proj(out)

    class LlamaMLP(nnx.Module):
        def __init__(self, c: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: Any):
            kw = dict(use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.gate_proj = nnx.Linear(c.hidden_size, c.intermediate_size, **kw)
            self.up_proj = nnx.Linear(c.hidden_size, c.intermediate_size, **kw)
            self.down_proj = nnx.Linear(c.intermediate_size, c.hidden_size, **kw)

        def __call__(self, h: jax.Array) -> jax.Array:
            gate, up = fused_linears(h, (self.gate_proj, self.up_proj))
            return self.down_proj(jax.nn.silu(gate) * up)

    class LlamaDecoderLayer(nnx.Module):
        def __init__(self, c: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: Any):
            kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.self_attn = LlamaAttention(c, **kw)
            self.mlp = LlamaMLP(c, **kw)
            self.input_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
            self.post_attention_layernorm = LlamaRMSNorm(
                c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype
            )

        def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin)
            return h + self.mlp(self.post_attention_layernorm(h))

    class LlamaModel(nnx.Module):
        def __init__(self, c: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: Any):
            self.config = c
            self.dtype = dtype
            self.embed_tokens = nnx.Embed(
                c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            self.layers = nnx.List(
                [
                    LlamaDecoderLayer(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                    for _ in range(c.num_hidden_layers)
                ]
            )
            self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)

        def __call__(self, input_ids: jax.Array) -> jax.Array:
            if jnp.ndim(input_ids) != 2:
                raise ValueError(
                    f"input_ids must be [batch, seq] token ids, got shape {jnp.shape(input_ids)} (one sequence: "
                    "ids[None])"
                )
            h = self.embed_tokens(input_ids)
            if self.dtype is not None:
                h = h.astype(self.dtype)
            cos, sin = _rotary(jnp.arange(input_ids.shape[1]), self.config)
            for layer in self.layers:
                h = layer(h, cos, sin)
            return self.norm(h)

    class LlamaForCausalLM(nnx.Module):
        """``LlamaForCausalLM`` in flax.nnx: ``model(input_ids [batch, seq]) -> logits [batch, seq, vocab]``.

        Args:
            config: the model's :class:`LlamaConfig`.
            dtype: computation dtype (None: the parameters' dtype).
            param_dtype: dtype of freshly initialized parameters.
            rngs: ``nnx.Rngs`` for initialization.
        """

        def __init__(
            self, config: LlamaConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: Any
        ):
            self.config = config
            self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if not config.tie_word_embeddings:
                self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)  # fmt: skip

        def __call__(self, input_ids: jax.Array) -> jax.Array:
            # the ids, and the weights of the embedding, the first layer and the head, say where the model
            # lies (all of its weights would cost a walk of the whole graph on every eager call); ValueError
            # where they lie on two meshes
            first = [self.model.layers[0]] if len(self.model.layers) else []
            placed = [self.model.embed_tokens, *first, getattr(self, "lm_head", None)]
            mesh = explicit_mesh(input_ids, [nnx.state(part) for part in placed if part is not None])
            if mesh is None and explicit_axes(jax.sharding.get_abstract_mesh()):
                mesh = jax.sharding.get_abstract_mesh()
            if mesh is None:
                return self._logits(input_ids)
            return self._on_auto_axes(input_ids, mesh)

        def _on_auto_axes(self, input_ids: jax.Array, mesh: Any) -> jax.Array:
            """The forward with the mesh's Explicit axes made Auto, so that XLA places every activation
            whichever weights the user sharded (column, row, heads, batch); the logits come out sharded as
            the ids on their axes, the vocabulary whole. It runs on this module itself (its variables hold
            the weights as the body sees them for the call), so that what a call changes (dropout's random
            counters) stays changed, and hooks on its submodules see the call."""
            from flax.errors import TraceContextError

            variables = [var for _, var in nnx.to_flat_state(nnx.state(self))]
            before = [_value(var) for var in variables]
            try:
                for var, value in zip(variables, before):
                    _set(var, value)  # unchanged: may this trace change them?
            except TraceContextError:  # a model captured by a jax.jit: a copy runs (nothing can change)
                graph, state = nnx.split(self)
                return with_auto_axes(
                    lambda state, ids: nnx.merge(graph, state)._logits(ids), (state, input_ids),
                    _logits_spec(input_ids), mesh,
                )  # fmt: skip
            changed: dict[int, Any] = {}

            def run(values: list[Any], ids: jax.Array) -> jax.Array:
                for var, value in zip(variables, values, strict=True):
                    _set(var, value)
                out = self._logits(ids)
                now = [_value(var) for var in variables]
                changed.update(
                    (i, new)
                    for i, (new, value) in enumerate(zip(now, values))
                    if isinstance(new, jax.Array) and new is not value
                )
                return out

            try:
                logits = with_auto_axes(run, (before, input_ids), _logits_spec(input_ids), mesh)
            finally:
                for var, value in zip(variables, before, strict=True):
                    _set(var, value)
            if changed:  # placed back as each variable was
                specs = {i: getattr(jax.typeof(before[i]).sharding, "spec", P()) for i in changed}
                placed = with_auto_axes(lambda: dict(changed), (), specs, mesh)
                for i, value in placed.items():
                    _set(variables[i], value)
            return logits

        def _logits(self, input_ids: jax.Array) -> jax.Array:
            h = self.model(input_ids)
            if self.config.tie_word_embeddings:
                return self.model.embed_tokens.attend(h)
            return self.lm_head(h)

    return LlamaForCausalLM


_CLASS = None


def llama_for_causal_lm(
    config: LlamaConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: Any = None
) -> Any:
    """Builds a :class:`LlamaForCausalLM` nnx module (flax needed). ``rngs`` default: ``nnx.Rngs(0)``."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_modules()
    return _CLASS(
        config, dtype=dtype, param_dtype=param_dtype, rngs=rngs if rngs is not None else _nnx().Rngs(0)
    )


def abstract_llama(config: LlamaConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32) -> Any:
    """The model's parameter structure with shapes and dtypes only (``nnx.eval_shape``): a target to load a
    checkpoint into without allocating the random initial weights."""
    nnx = _nnx()
    return nnx.eval_shape(lambda: llama_for_causal_lm(config, dtype=dtype, param_dtype=param_dtype))
