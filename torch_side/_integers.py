"""Integer arguments read alike by torch_side and jax_side: ints of any kind (numpy's too), never floats
or bools, and an FP8 block size as ``(rows, cols)``.

Standard library only: jax_side loads this file by its path (``jax_side._cpu_kernel._shared``), without
importing torch_side, so that both halves read these arguments with one piece of code.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer of any kind (Python's, numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def block_pair(block_size: Any) -> tuple[int, int]:
    """``block_size`` (an int, or a pair of them) as ``(rows, cols)``.

    Raises:
        ValueError: not a positive int or a pair of them (floats and bools included).
    """
    pair: tuple[Any, ...]
    try:
        pair = (block_size, block_size) if is_int(block_size) else tuple(block_size)
    except TypeError:  # a float, say: not a pair either
        pair = (block_size,)
    if len(pair) != 2 or not all(is_int(b) and b > 0 for b in pair):
        raise ValueError(f"block_size must be a positive int or a pair of them, got {block_size!r}")
    return (operator.index(pair[0]), operator.index(pair[1]))


def as_int(value: Any, what: str) -> int:
    """``value`` as an int: Python's and numpy's ints, and anything else with ``__index__`` (a 0-d integer
    tensor), never a float, a string or a bool.

    Raises:
        TypeError: ``value`` is not an integer; the message names ``what``.
    """
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an int, got {value!r}")
