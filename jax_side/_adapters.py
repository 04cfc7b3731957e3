"""Attaching LoRA adapters to a model's kept-quantized Linear layers, and finding or removing them (the
adapters themselves, their configuration and arithmetic: ``_lora``; the layers: ``_qlayers``)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ._lora import ALL_LINEAR, LoraConfig, _nnx, lora_adapter_class
from ._qlayers import _classes


def add_lora(model: Any, config: LoraConfig, *, rngs: Any = None, dtype: Any = jnp.float32) -> list[str]:
    """Adds LoRA adapters, in place, to the kept-quantized Linear layers of an nnx model that ``config``
    targets (:class:`QuantLinear`, as ``load_quantized_into_nnx`` puts them in).

    Args:
        model: an ``nnx.Module``.
        config: which layers, rank, alpha, dropout.
        rngs: ``nnx.Rngs`` for ``lora_A`` and dropout (default ``nnx.Rngs(0)``).
        dtype: the adapters' dtype (float32, as QLoRA keeps them).

    A layer that has adapters already gets new ones (of this config); ``jax_side.remove_lora(model)`` takes
    every adapter off first, so that one config covers the model (``qbridge.save_peft_adapter`` writes one).

    Returns:
        The dotted paths of the adapted layers (``model.layers.0.self_attn.q_proj`` ...).

    Raises:
        ValueError: nothing matched ``config.target_modules``.
        TypeError: ``config`` is no :class:`LoraConfig`; a matched layer is a dense ``nnx.Linear``: adapters
            attach to kept-quantized layers (load with ``keep_quantized=True``); a matched layer is an
            embedding table (``embed_tokens``), which PEFT adapts with embedding adapters that are not made
            here.
    """
    nnx = _nnx()
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    targets = lora_targets(model, config)
    for node in targets.values():
        node.lora = lora_adapter_class()(node.in_features, node.out_features, config, rngs=rngs, dtype=dtype)
    return sorted(targets)


def lora_targets(model: Any, config: LoraConfig) -> dict[str, Any]:
    """``dotted path -> layer`` for the kept-quantized Linear layers of ``model`` that ``config`` targets,
    changing nothing. Raises as :func:`add_lora` does."""
    nnx = _nnx()
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"config must be a jax_side.LoraConfig, got {type(config).__module__}.{type(config).__qualname__} "
            "(make one with jax_side.LoraConfig(r=..., lora_alpha=..., target_modules=[...]); from PEFT's "
            "config or its adapter_config.json: jax_side.LoraConfig.from_peft(peft_config.to_dict()))"
        )
    quant_linear = _classes()["QuantLinear"]
    layers = [(".".join(str(p) for p in path), node) for path, node in nnx.iter_graph(model)]
    embeddings = (nnx.Embed, _classes()["QuantEmbed"])
    for name, node in layers:
        if isinstance(node, embeddings) and config.matches(name) and config.target_modules != ALL_LINEAR:
            raise TypeError(f"{name} is an embedding table: LoRA adapters here attach to Linear layers only (PEFT's "
                            "lora_embedding_A/B are not made here, and a saved adapter config naming it would promise "
                            "them); leave it out of target_modules")  # fmt: skip
    for name, node in layers:
        if isinstance(node, nnx.Linear) and config.matches(name) and config.target_modules != ALL_LINEAR:
            raise TypeError(f"{name} is a dense nnx.Linear: LoRA adapters here attach to kept-quantized layers only. "
                            "Its weight is not quantized in this model: it was loaded dense (load the checkpoint with "
                            "keep_quantized=True and jax_side.load_quantized_into_nnx), or the checkpoint does not "
                            "quantize it (bitsandbytes leaves lm_head dense); leave it out of target_modules")  # fmt: skip
    targets = {name: node for name, node in layers if isinstance(node, quant_linear) and config.matches(name)}
    if not targets:
        held = [name for name, node in layers if isinstance(node, quant_linear)]
        if not held:
            raise ValueError(
                f"no kept-quantized Linear matches target_modules={config.target_modules!r}: the model holds none "
                "(LoRA adapters here attach to kept-quantized layers: load the checkpoint with keep_quantized=True "
                "and put it in with jax_side.load_quantized_into_nnx)"
            )
        hint = (
            f" (one string is a regular expression over the whole dotted path, such as {held[0]!r}; to name "
            f"modules, pass a list: [{config.target_modules!r}])"
            if isinstance(config.target_modules, str)
            else ""
        )
        raise ValueError(
            f"no kept-quantized Linear matches target_modules={config.target_modules!r}{hint}; the model's "
            f"kept-quantized Linear layers are {held[:4]}{' ...' if len(held) > 4 else ''} ({len(held)} in all)"
        )
    return targets


def remove_lora(model: Any) -> list[str]:
    """Takes every LoRA adapter off an nnx model (the layers compute their base again); returns their paths."""
    nnx = _nnx()
    quant_linear = _classes()["QuantLinear"]
    removed = []
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, quant_linear) and node.lora is not None:
            node.lora = nnx.data(None)
            removed.append(".".join(str(p) for p in path))
    return sorted(removed)


def lora_layers(model: Any) -> dict[str, Any]:
    """``dotted path -> adapter`` for every layer of an nnx model that holds LoRA adapters."""
    nnx = _nnx()
    cls = lora_adapter_class()
    return {
        ".".join(str(p) for p in path[:-1]): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, cls)
    }
