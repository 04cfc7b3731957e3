"""Arrays made to vary alike inside ``jax.shard_map`` with ``check_vma=True``.

A computation JAX cannot see into (a Pallas kernel, an XLA FFI call) must say along which mesh axes its
result varies. Its operands are first made to vary along every axis any of them varies along
(``jax.lax.pcast``); the result then varies as they all do. Outside such a shard_map nothing varies and
nothing changes.
"""

from __future__ import annotations

from typing import Any

import jax


def _varying_axes(a: Any) -> frozenset[Any]:
    return frozenset(getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", ()))


def vary_alike(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args``, each made to vary along every mesh axis any of them varies along."""
    axes = frozenset().union(*(_varying_axes(a) for a in args))
    if not axes:  # varying along no axis (outside shard_map: no manual axes at all)
        return tuple(args)

    def vary(a: jax.Array) -> jax.Array:
        missing = axes - _varying_axes(a)
        return jax.lax.pcast(a, tuple(sorted(missing)), to="varying") if missing else a

    return tuple(vary(a) for a in args)
