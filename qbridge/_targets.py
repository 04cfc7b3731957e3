"""Targets named in words: the built-in Flax Llama, or a Flax model class (or factory) by import path, built
from a checkpoint's ``config.json`` with shapes only (nothing allocated)."""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
from typing import Any

import jax_side

from ._checkpoint import config_dtype, read_config
from ._errors import CheckpointError


def _config(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    path = pathlib.Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory or file")
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.exists():
        raise CheckpointError(f"{config}: a target built from the checkpoint's config needs its config.json")
    return read_config(path)  # the checkpoint reader's checks


def import_object(spec: str, what: str) -> Any:
    """The object ``'package.module:Name'`` names (``Name`` may be dotted). A module that is not importable
    as it stands but lies in the current directory is imported from there, as ``python -m`` would find it.

    Raises:
        ValueError: ``spec`` is not ``'package.module:Name'`` (no ``':'``, an empty part, a file path).
        ImportError: the module cannot be imported (whatever importing it raised) or does not hold ``Name``
            (``what`` and ``spec`` named; the original error chained).
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or "/" in module_name or module_name.endswith(".py"):
        hint = (
            f" (a module name, not a file: run from its directory and give '{pathlib.Path(module_name).stem}:{attr}')"
            if module_name.endswith(".py") or "/" in module_name
            else ""
        )
        raise ValueError(f"{what} {spec!r}: name an object by import path, 'package.module:Name'{hint}")
    top = module_name.split(".")[0]
    try:
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            here = os.getcwd()
            if e.name != top or not (os.path.exists(f"{top}.py") or os.path.isdir(top)) or here in sys.path:
                raise
            sys.path.insert(0, here)
            try:
                obj = importlib.import_module(module_name)
            finally:
                sys.path.remove(here)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # ImportError, a missing name, or whatever importing the user's module raised
        hint = ""
        if top == "transformers" and attr.startswith("Flax"):
            import transformers

            hint = (
                f"; transformers {transformers.__version__} has no Flax classes: they need transformers 4.57 or "
                "older (pip install 'transformers==4.57.6')"
            )
        raise ImportError(f"{what} {spec!r}: cannot import it ({type(e).__name__}: {e}){hint}") from e
    return obj


def build_target(spec: str, checkpoint: str | os.PathLike[str], *, param_dtype: Any = None) -> Any:
    """A target for :func:`qbridge.load_checkpoint` / :func:`qbridge.convert_checkpoint`, named in words.

    Args:
        spec: ``"llama"`` (``jax_side``'s Flax Llama), or ``"package.module:Name"``: a transformers Flax model
            class (built with ``_do_init=False``: its ``params_shape_tree``), a flax.nnx ``Module`` class
            taking ``(config, rngs=...)`` (built with ``nnx.eval_shape``), or any callable taking the
            checkpoint's config as a dict and returning a target.
        checkpoint: the checkpoint directory (or a file in it) whose ``config.json`` sizes the model.
        param_dtype: the parameters' dtype for the built-in Llama (default: the checkpoint's model dtype
            from its config, ``dtype`` or ``torch_dtype``, else float32).

    Returns:
        Shapes and dtypes only (``jax.ShapeDtypeStruct`` leaves or an abstract nnx module): nothing is
        allocated.

    Raises:
        ValueError: an unknown ``spec``.
        ImportError: the import path does not resolve.
        CheckpointError: the checkpoint has no readable ``config.json``.
    """
    config = _config(checkpoint)
    if spec == "llama":
        import jax.numpy as jnp

        stored = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(
            str(config_dtype(config)[1]), jnp.float32
        )
        return jax_side.abstract_llama(
            jax_side.LlamaConfig.from_hf(config), param_dtype=param_dtype or stored
        )
    if ":" not in spec:
        raise ValueError(
            f"target {spec!r}: name 'llama' or a class by import path, 'package.module:ClassName'"
        )
    obj = import_object(spec, "target")
    if (
        isinstance(obj, type) and hasattr(obj, "config_class") and hasattr(obj, "init_weights")
    ):  # transformers Flax
        plain = {k: v for k, v in config.items() if k != "quantization_config"}
        return obj(obj.config_class.from_dict(plain), _do_init=False).params_shape_tree
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is an extra
        nnx = None  # type: ignore[assignment]
    if nnx is not None and isinstance(obj, type) and issubclass(obj, nnx.Module):
        module: Any = obj  # a user's Module subclass: its own constructor
        return nnx.eval_shape(lambda: module(config, rngs=nnx.Rngs(0)))
    if callable(obj):
        return obj(config)
    raise ValueError(f"target {spec!r} is a {type(obj).__name__}, not a model class or a callable")
