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
        by_config: dict[Any, list[str]] = {}
        for name, adapter in sorted(layers.items()):
            by_config.setdefault(adapter.config, []).append(name)
        made = "; ".join(
            f"{c} on {names[:3]}{' ...' if len(names) > 3 else ''}" for c, names in by_config.items()
        )
        raise ValueError(
            f"the adapters were made with {len(configs)} different LoraConfigs ({made}); PEFT's file holds one: "
            "call jax_side.remove_lora(model) and then jax_side.add_lora(model, config) once for the whole model"
        )
    config = configs.pop()
    tensors = {}
    for name, adapter in sorted(layers.items()):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = jnp.asarray(adapter.lora_A[...]).T.copy()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = jnp.asarray(adapter.lora_B[...]).T.copy()
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    doc = {
        **config.to_peft(),
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
    }
    (out / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return out


def _layer_of(key: str) -> str:
    """The layer's dotted path in an adapter file's key (``base_model.model.<path>.lora_A[.default].weight``)."""
    return key.removeprefix(PREFIX).split(".lora_", 1)[0]


def _same_tensor(a: Any, b: Any) -> bool:
    """Whether two arrays hold the same dtype, shape and bits."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _module_at(model: Any, path: str) -> Any:
    """The submodule of ``model`` at a dotted torch path (``model.layers.0.mlp``), or None."""
    node = model
    for part in path.split("."):
        try:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
    return node


def load_peft_adapter(
    model: Any, directory: str | os.PathLike[str], *, rngs: Any = None, autocast_adapter_dtype: bool = True
) -> list[str]:
    """Reads a PEFT LoRA adapter directory into an nnx model with kept-quantized layers: adds the adapters
    its config names (``jax_side.add_lora``; dropout off until ``model.train()``) and sets their values,
    exactly. ``autocast_adapter_dtype``: as ``peft.PeftModel.from_pretrained``'s (default True), float16 and
    bfloat16 adapters are widened to float32 (exactly); False keeps the file's dtypes. Either way each
    adapter keeps its own (a file that mixes dtypes loads each tensor in its own).

    Returns:
        The dotted paths of the adapted layers.

    Raises:
        CheckpointError: a missing or unreadable file, a config these layers do not implement (DoRA,
            trained biases ...: ``jax_side.LoraConfig.from_peft``), ``target_modules`` that name no
            kept-quantized layer or name a dense one, keys without PEFT's ``base_model.model.`` prefix (all
            or some), one adapter under both of PEFT's spellings (``lora_A.weight`` and
            ``lora_A.default.weight``) with different dtypes, shapes or values (the same bits load), adapters
            for layers the model lacks or the config does not name (named), missing adapters, or shapes and
            dtypes that do not fit. Nothing is changed then; on
            success the file's adapters replace any the model had.
    """
    from safetensors.flax import load_file

    path = pathlib.Path(directory)
    import jax.numpy as jnp

    for name in (CONFIG, WEIGHTS):
        if not (path / name).exists():
            raise CheckpointError(
                f"{path / name}: missing (a PEFT adapter directory holds {CONFIG} and {WEIGHTS})"
            )
    try:
        doc = json.loads((path / CONFIG).read_text())
        tensors = load_file(str(path / WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PEFT adapter ({type(e).__name__}: {e})") from e
    try:
        config = jax_side.LoraConfig.from_peft(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from e
    try:
        targets = jax_side.lora_targets(model, config)  # everything is checked before the model changes
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from e
    unprefixed = sorted(k for k in tensors if not k.startswith(PREFIX))
    if unprefixed:
        some = ", ".join(unprefixed[:2]) + (", ..." if len(unprefixed) > 2 else "")
        if len(unprefixed) == len(tensors):
            which = "no key starts"
        else:
            which = f"{len(unprefixed)} of {len(tensors)} keys {'does' if len(unprefixed) == 1 else 'do'} not start"
        raise CheckpointError(
            f"{path / WEIGHTS}: {which} with {PREFIX!r} ({some}), as PEFT's "
            f"save_pretrained writes them and its loader reads them: not a PEFT adapter file as saved, or its keys "
            f"were renamed (prefix them with {PREFIX!r})"
        )
    both = sorted(k for k in tensors if ".default." in k and k.replace(".default.", ".") in tensors)
    differ = [k for k in both if not _same_tensor(tensors[k], tensors[k.replace(".default.", ".")])]
    if differ:
        a, b = tensors[differ[0]], tensors[differ[0].replace(".default.", ".")]
        how = (
            f"different dtypes ({a.dtype} and {b.dtype})"
            if a.dtype != b.dtype
            else f"different shapes ({tuple(a.shape)} and {tuple(b.shape)})"
            if a.shape != b.shape
            else "different values"
        )
        raise CheckpointError(
            f"{path / WEIGHTS}: holds {differ[0]!r} and {differ[0].replace('.default.', '.')!r}"
            + (f" (and {len(differ) - 1} more such pairs)" if len(differ) > 1 else "")
            + f", two spellings of one adapter with {how}; which one is the adapter is not known: keep one"
        )
    values = {}
    for name, layer in targets.items():
        for attr, shape in (
            ("lora_A", (config.r, layer.in_features)),
            ("lora_B", (layer.out_features, config.r)),
        ):
            key = f"{PREFIX}{name}.{attr}.weight"
            value = tensors.get(key, tensors.get(key.replace(".weight", ".default.weight")))
            if value is None:
                continue
            if tuple(value.shape) != shape or not jnp.issubdtype(value.dtype, jnp.floating):
                raise CheckpointError(
                    f"{path / WEIGHTS} [{key}]: {value.dtype} {tuple(value.shape)}, the layer needs floating {shape}"
                )
            values[(name, attr)] = value
    wanted = {f"{PREFIX}{n}.{ab}.weight" for n in targets for ab in ("lora_A", "lora_B")}
    extra = sorted(k for k in tensors if k.replace(".default.", ".") not in wanted)
    missing = sorted(
        f"{PREFIX}{n}.{ab}.weight" for n in targets for ab in ("lora_A", "lora_B") if (n, ab) not in values
    )
    if extra or missing:
        quantized = jax_side.lora_targets(model, jax_side.LoraConfig(target_modules="all-linear"))
        untargeted = [k for k in extra if _layer_of(k) in quantized]
        lacking = [k for k in extra if k not in untargeted]
        # layers the model has, of a kind that takes no LoRA here (an embedding's lora_embedding_A/B)
        layers = {k: _layer_of(k).split(".base_layer", 1)[0] for k in lacking}
        held = {k: _module_at(model, name) for k, name in layers.items()}
        other = sorted({f"{layers[k]} ({type(m).__name__})" for k, m in held.items() if m is not None})
        lacking = [k for k, m in held.items() if m is None]
        problems = []
        if other:
            problems.append(
                f"adapters for layers that are not linear: {other}; LoRA adapters are loaded onto linear layers "
                "only (train and save the adapter with target_modules naming linear layers)"
            )
        if lacking:
            problems.append(f"adapters for layers the model lacks: {lacking}")
        if untargeted:
            problems.append(
                f"adapters for layers {CONFIG}'s target_modules={config.target_modules!r} does not name: {untargeted}"
            )
        if missing:
            problems.append(f"layers without adapters: {missing}")
        raise CheckpointError(f"{path / WEIGHTS}: " + "; ".join(problems))
    # each adapter keeps its own dtype (a file may mix them), float16 and bfloat16 widened to float32 with
    # autocast_adapter_dtype, as PEFT's default on loading does
    dtypes = {
        k: jnp.dtype(jnp.float32)
        if autocast_adapter_dtype and v.dtype in (jnp.float16, jnp.bfloat16)
        else jnp.dtype(v.dtype)
        for k, v in values.items()
    }
    jax_side.remove_lora(model)  # the file's adapters replace any the model had
    first = next(iter(dtypes.values()))
    names = jax_side.add_lora(model, config, rngs=rngs, dtype=first)
    layers = jax_side.lora_layers(model)
    for (name, attr), value in values.items():
        kept = value.T.astype(dtypes[(name, attr)])
        if kept.dtype == first:
            getattr(layers[name], attr)[...] = kept
        else:  # an adapter of another dtype than the one add_lora made: a parameter of its own dtype
            setattr(layers[name], attr, type(getattr(layers[name], attr))(kept))
    return sorted(names)
