"""LoRA adapters on kept-quantized layers (QLoRA), with PEFT's configuration, initialization and arithmetic.

A LoRA layer adds ``dropout(x) @ A @ B * scaling`` to a frozen base layer: ``A`` is ``[in, r]``, ``B``
``[r, out]`` (PEFT's ``lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]`` transposed, the Flax
kernel convention), ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``). As PEFT does:
``A`` starts kaiming-uniform (``a = sqrt(5)``: uniform in ``+-1/sqrt(in)``), ``B`` at zero, so the adapted
layer starts equal to its base; the input is cast to the adapters' dtype, the product multiplied by
``scaling`` in that dtype and then cast to the base output's dtype (``peft.tuners.lora.bnb.Linear4bit.forward``,
PEFT 0.21).

The adapters are ``nnx.LoRAParam`` (a ``Param``): train them alone with ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)``; the quantized weights are no ``Param`` and never receive gradients. In linen they live
in their own ``"lora"`` collection.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

ALL_LINEAR = "all-linear"
OUTPUT_LAYERS = ("lm_head",)  # PEFT's all-linear leaves the output layer out


# adapter_config.json fields these layers honour, or that do not change what a loaded adapter computes
# (bookkeeping, how the factors were initialized or trained, runtime options)
_LORA_FIELDS_HONOURED = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights",
    "layers_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "runtime_config",
})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which layers get adapters, and their shape, as PEFT's ``LoraConfig`` spells it.

    Attributes:
        r: the rank.
        lora_alpha: the scale numerator (``scaling = lora_alpha / r``).
        lora_dropout: dropout on the adapters' input while training: off when the adapters are made (as PEFT
            hands out a loaded adapter), on after ``model.train()``, off again after ``model.eval()``.
        target_modules: module names as PEFT matches them (a name matches a module whose dotted path is it or
            ends with ``"." + name``: ``("q_proj", "v_proj")``), ``"all-linear"`` (every kept-quantized
            Linear but the output layer), or one string used as a regular expression over the full path.
        use_rslora: ``scaling = lora_alpha / sqrt(r)``.
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self) -> None:
        """Raises ValueError for a field these layers cannot use, named, so that a config that was made can
        be applied, saved and loaded back. Numbers are kept as Python numbers (``lora_alpha`` and
        ``lora_dropout`` as floats, ``use_rslora`` as a bool; None is False, as in ``from_peft``); a
        ``lora_alpha`` traced by JAX (a sweep under ``jax.vmap``, a gradient) is kept as it is."""
        if not isinstance(self.r, numbers.Integral) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        object.__setattr__(self, "r", int(self.r))
        if not isinstance(self.lora_alpha, jax.core.Tracer):
            alpha = _as_float(self.lora_alpha)
            if alpha is None or not math.isfinite(alpha):
                raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
            object.__setattr__(self, "lora_alpha", alpha)
        dropout = _as_float(self.lora_dropout)
        if dropout is None or not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        object.__setattr__(self, "lora_dropout", dropout)
        rslora = False if self.use_rslora is None else self.use_rslora
        if (
            isinstance(rslora, (str, bytes))
            or getattr(rslora, "shape", ()) != ()
            or rslora not in (True, False)
        ):
            raise ValueError(f"use_rslora must be True or False, got {self.use_rslora!r}")
        object.__setattr__(self, "use_rslora", bool(rslora))
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as e:
                    raise ValueError(
                        f"target_modules {targets!r} is one string, used as a regular expression over the full "
                        f"path, and not a valid one ({e}); name modules in a list: ['q_proj', 'v_proj']"
                    ) from None
            return
        names: Any = list(targets) if isinstance(targets, Iterable) else targets
        if not isinstance(names, list) or not all(isinstance(t, str) for t in names):
            raise ValueError(
                "target_modules must be module names (a list, tuple or set of strings), 'all-linear' or one "
                f"regular expression, got {targets!r}"
            )
        object.__setattr__(self, "target_modules", tuple(sorted(names)))  # a set of names, as PEFT keeps them

    @property
    def scaling(self) -> float:
        """The factor PEFT applies to the adapter product, ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, path: str) -> bool:
        """Whether the layer at dotted ``path`` gets an adapter (PEFT's matching rules)."""
        if self.target_modules == ALL_LINEAR:
            return path.rpartition(".")[2] not in OUTPUT_LAYERS
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        return any(path == t or path.endswith("." + t) for t in self.target_modules)

    def to_peft(self) -> dict[str, Any]:
        """The fields of PEFT's ``adapter_config.json`` this config sets."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {"peft_type": "LORA", "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": targets, "use_rslora": self.use_rslora, "bias": "none", "fan_in_fan_out": False,
                "use_dora": False, "init_lora_weights": True, "modules_to_save": None}  # fmt: skip

    @classmethod
    def from_peft(cls, doc: Mapping[str, Any]) -> LoraConfig:
        """From PEFT's ``adapter_config.json``.

        Raises:
            ValueError: a PEFT feature these layers do not implement (DoRA, aLoRA, trained biases,
                fan_in_fan_out, modules_to_save, per-layer ranks or alphas, and any field this version does not
                know, set), named.
        """
        if not isinstance(doc, Mapping):
            raise ValueError(f"an adapter config is a JSON object, found {type(doc).__name__}")
        if doc.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter is {doc.get('peft_type')!r}, not LORA")
        # every other field, set to anything but its off value (None, False, empty, bias "none"), changes what
        # the adapter computes (DoRA, aLoRA, per-layer ranks, ...) or is unknown here: refused, named
        unsupported = [
            k
            for k, v in doc.items()
            if k not in _LORA_FIELDS_HONOURED and v not in (None, False, {}, [], "none")
        ]
        if unsupported:
            raise ValueError(
                f"adapter uses PEFT features these layers do not implement: {', '.join(f'{k}={doc[k]!r}' for k in unsupported)}"
            )
        r = doc.get("r")
        if isinstance(r, float) and r.is_integer():
            r = int(r)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"adapter config: r must be a positive integer, found {r!r}")
        targets = doc.get("target_modules") or ()
        # null fields take PEFT's defaults; the values are checked as a config made here is ("false" is no bool)
        alpha, dropout = doc.get("lora_alpha"), doc.get("lora_dropout")
        return cls(r=r, lora_alpha=8.0 if alpha is None else alpha, lora_dropout=0.0 if dropout is None else dropout,
                   target_modules=targets if isinstance(targets, str) else tuple(targets), use_rslora=doc.get("use_rslora") or False)  # fmt: skip


def _as_float(x: Any) -> float | None:
    """``x`` as a Python float where it is one real number (an int or a float, numpy's, JAX's or torch's
    scalars too), else None (a bool, a string, an array of several values, too large for a float)."""
    if isinstance(x, (bool, str, bytes)) or str(getattr(x, "dtype", "")) in ("bool", "torch.bool"):
        return None
    if not isinstance(x, numbers.Real) and tuple(getattr(x, "shape", (None,))) != ():
        return None
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return None


def init_lora_a(key: jax.Array, in_features: int, r: int, dtype: Any = jnp.float32) -> jax.Array:
    """PEFT's ``lora_A`` initialization (``kaiming_uniform_(a=sqrt(5))``: uniform in ``+-1/sqrt(in)``), as
    ``[in, r]``."""
    bound = 1.0 / math.sqrt(in_features)
    return jax.random.uniform(key, (in_features, r), dtype, -bound, bound)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scaling: float, out_dtype: Any) -> jax.Array:
    """``(x @ A @ B) * scaling`` in the adapters' dtype, then cast to ``out_dtype``: PEFT's order
    (``peft.tuners.lora.bnb.Linear4bit.forward``, PEFT 0.21: ``lora_B(lora_A(dropout(x))) * scaling``, then
    ``.to(result.dtype)``). The product is multiplied by ``scaling`` in float32 (at least) and rounded once
    to the adapters' dtype, as torch multiplies a tensor by a Python number."""
    product = (x.astype(a.dtype) @ a) @ b
    # torch multiplies a float16/bfloat16 tensor by a Python float in float32 and rounds once; JAX would round
    # scaling to the product's dtype first (16/12 -> 1.3359375 in bfloat16)
    wide = jnp.promote_types(product.dtype, jnp.float32)
    return (product.astype(wide) * scaling).astype(product.dtype).astype(out_dtype)


def _nnx():
    from flax import nnx

    return nnx


_ADAPTER: dict[str, Any] = {}


def lora_adapter_class() -> Any:
    """The nnx module holding one layer's adapters (built on first use: flax is optional)."""
    if "cls" not in _ADAPTER:
        _nnx()  # raises the install hint when flax is missing
        from flax import nnx

        class LoRAAdapter(nnx.Module):
            """``lora_A`` ``[in, r]`` and ``lora_B`` ``[r, out]`` (``nnx.LoRAParam``), dropout, and the config."""

            def __init__(
                self,
                in_features: int,
                out_features: int,
                config: LoraConfig,
                *,
                rngs: Any,
                dtype: Any = jnp.float32,
            ):
                self.config = config
                self.lora_A = nnx.LoRAParam(init_lora_a(rngs.params(), in_features, config.r, dtype))
                self.lora_B = nnx.LoRAParam(jnp.zeros((config.r, out_features), dtype))
                # created off, as PEFT hands out a loaded adapter in eval mode: model.train() turns it on
                self.dropout = (
                    nnx.Dropout(config.lora_dropout, deterministic=True, rngs=rngs)
                    if config.lora_dropout
                    else None
                )

            def __call__(self, x: jax.Array, out_dtype: Any) -> jax.Array:
                if self.dropout is not None:
                    x = self.dropout(x.astype(self.lora_A[...].dtype))
                return lora_delta(x, self.lora_A[...], self.lora_B[...], self.config.scaling, out_dtype)

        _ADAPTER["cls"] = LoRAAdapter
    return _ADAPTER["cls"]
