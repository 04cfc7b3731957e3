"""LoRA adapters between JAX and PEFT: a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) written from, or read into, an nnx model's adapters (``jax_side.add_lora``).

PEFT's layout: ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``
(torch Linear order); the nnx adapters hold ``[in, r]`` and ``[r, out]``, the transposes. Values cross
exactly: float32 adapters stay float32 (``peft.PeftModel.from_pretrained`` reads them as they are).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

import jax_side

from ._errors import CheckpointError

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def save_peft_adapter(
    model: Any,
    directory: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> pathlib.Path:
    """Writes an nnx model's LoRA adapters as a PEFT adapter directory.

    Args:
        model: an nnx model with adapters (``jax_side.add_lora`` / :func:`load_peft_adapter`); its module paths
            are the torch module names (as ``jax_side``'s Llama mirrors transformers').
        directory: created if needed; ``adapter_config.json`` and ``adapter_model.safetensors`` are written.
        base_model_name_or_path: recorded in the config, as PEFT does (the base checkpoint).
        task_type: PEFT's task type.

    Returns:
        The directory, for ``peft.PeftModel.from_pretrained(torch_model, directory)``.

    Raises:
        ValueError: the model has no adapters, or adapters with different configurations.
    """
    import jax.numpy as jnp
    from safetensors.flax import save_file

    layers = jax_side.lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters: add them with jax_side.add_lora")
    configs = {adapter.config for adapter in layers.values()}
    if len(configs) != 1:
        raise ValueError(f"the adapters were made with {len(configs)} different LoraConfigs; PEFT's file holds one")
    config = configs.pop()
    tensors = {}
    for name, adapter in sorted(layers.items()):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = jnp.asarray(adapter.lora_A[...]).T.copy()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = jnp.asarray(adapter.lora_B[...]).T.copy()
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    doc = {**config.to_peft(), "task_type": task_type, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}
    (out / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return out


def load_peft_adapter(model: Any, directory: str | os.PathLike[str], *, rngs: Any = None) -> list[str]:
    """Reads a PEFT LoRA adapter directory into an nnx model with kept-quantized layers: adds the adapters
    its config names (``jax_side.add_lora``) and sets their values, exactly.

    Returns:
        The dotted paths of the adapted layers.

    Raises:
        CheckpointError: a missing or unreadable file, adapters for layers the model lacks (named), missing
            adapters, or shapes that do not fit.
        ValueError: a PEFT feature these layers do not implement (``jax_side.LoraConfig.from_peft``).
    """
    from safetensors.flax import load_file

    path = pathlib.Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).exists():
            raise CheckpointError(f"{path / name}: missing (a PEFT adapter directory holds {CONFIG} and {WEIGHTS})")
    try:
        doc = json.loads((path / CONFIG).read_text())
        tensors = load_file(str(path / WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PEFT adapter ({type(e).__name__}: {e})") from e
    config = jax_side.LoraConfig.from_peft(doc)
    dtype = next(iter(tensors.values())).dtype if tensors else np.float32
    names = list(jax_side.lora_layers(model)) or jax_side.add_lora(model, config, rngs=rngs, dtype=dtype)
    layers = jax_side.lora_layers(model)
    wanted = {f"{PREFIX}{n}.{ab}.weight" for n in names for ab in ("lora_A", "lora_B")}
    extra = sorted(k for k in tensors if k.replace(".default.", ".") not in wanted)
    missing = sorted(k for k in wanted if k not in tensors and k.replace(".weight", ".default.weight") not in tensors)
    if extra or missing:
        raise CheckpointError(f"{path / WEIGHTS}: adapters for layers the model lacks: {extra}; layers without adapters: {missing}")
    for name in names:
        adapter = layers[name]
        for attr in ("lora_A", "lora_B"):
            key = f"{PREFIX}{name}.{attr}.weight"
            value = tensors.get(key, tensors.get(key.replace(".weight", ".default.weight")))
            want = tuple(getattr(adapter, attr)[...].shape[::-1])
            if tuple(value.shape) != want:
                raise CheckpointError(f"{path / WEIGHTS} [{key}]: shape {tuple(value.shape)}, the layer needs {want}")
            getattr(adapter, attr)[...] = value.T
    return sorted(names)
