"""Sphinx configuration for qbridge's documentation.

Built strictly (``sphinx-build -W -n``, run by ``tests/test_docs.py``): every warning fails the build,
including a reference that resolves to nothing and a public name of ``torch_side``, ``jax_side`` or
``qbridge`` without a docstring (checked below, for each ``__all__`` entry and the public methods and
properties of public classes). The narrative pages include the README's sections, so the two never drift.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("TRITON_INTERPRET", "1")

project = "qbridge"
release = version = importlib.import_module("qbridge").__version__
author = "qbridge contributors"
copyright = "2026, qbridge contributors"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
napoleon_use_ivar = True  # "Attributes:" sections as fields: the dataclass fields are documented once
autodoc_inherit_docstrings = False

myst_heading_anchors = 3
# The pages include README sections whose headings start at level 2 or 3 under the page's own title.
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_static_path: list[str] = []

# References into other libraries resolve offline to nothing: the build has no network for intersphinx.
# They are named here, library by library; a reference to a qbridge name must resolve.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(torch|jax|jnp|np|numpy|flax|nnx|linen|optax|pandas|matplotlib|transformers|safetensors"
        r"|bitsandbytes|torchao|orbax|ocp|peft|triton|ml_dtypes|pathlib|os|types|collections|typing|concurrent"
        r"|dataclasses|enum|argparse|io)(\..*)?",
    ),
    (
        r"py:.*",
        r"(Any|Callable|Mapping|Sequence|Iterable|Iterator|PathLike|ArrayLike|DTypeLike|Path|Tensor"
        r"|Array|Device|Sharding|Mesh|PartitionSpec|NamedSharding|Module|Figure|DataFrame|Size|LlamaForCausalLM"
        r"|optional)",
    ),
]

PACKAGES = ("torch_side", "jax_side", "qbridge", "qbridge.parity")


def _documented(obj: object) -> bool:
    """Whether ``obj`` carries a docstring of its own (a dataclass's generated signature is none)."""
    if isinstance(obj, property):
        obj = obj.fget
    doc = (getattr(obj, "__doc__", None) or "").strip()
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return False
    return bool(doc)


def _public_members(obj: type) -> list[tuple[str, object]]:
    """Public methods and properties a class defines itself (not inherited from elsewhere)."""
    out = []
    for name, value in vars(obj).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if callable(value) or isinstance(value, (property, functools.cached_property)):
            out.append((name, value))
    return out


def _missing_docstrings(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Public names of ``packages`` (their ``__all__``) without a docstring: functions and other callables,
    classes, and the public methods and properties of the classes qbridge defines."""
    missing = []
    ours = {p.split(".")[0] for p in packages}
    for package in packages:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if not callable(obj):
                continue  # constants are described on their API page
            if not _documented(obj):
                missing.append(f"{package}.{name}")
            if inspect.isclass(obj) and obj.__module__.split(".")[0] in ours:
                missing += [f"{package}.{name}.{m}" for m, v in _public_members(obj) if not _documented(v)]
    return missing


def _check_docstrings(app) -> None:
    from sphinx.util import logging

    logger = logging.getLogger("qbridge.docs")
    for name in _missing_docstrings():
        logger.warning(f"public name without a docstring: {name}", type="qbridge", subtype="docstring")


def setup(app):
    app.connect("builder-inited", _check_docstrings)
