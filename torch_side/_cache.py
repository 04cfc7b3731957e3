"""qbridge's cache directory: where what is derived once per machine is kept (built kernels, model facts)."""

from __future__ import annotations

import os
import pathlib

CACHE_ENV = "QBRIDGE_CACHE_DIR"


def cache_dir() -> pathlib.Path | None:
    """Where qbridge remembers what it derived once: ``$QBRIDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/qbridge``
    or ``~/.cache/qbridge``; None when ``QBRIDGE_CACHE_DIR`` is ``off`` (any case), or without a home."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None and chosen.strip().lower() == "off":
        return None
    if chosen:
        return pathlib.Path(chosen)
    try:
        base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    except RuntimeError:  # no home directory to be found
        return None
    return pathlib.Path(base) / "qbridge"
