"""qbridge's exception family: checkpoint and format problems subclass QBridgeError."""

from __future__ import annotations


class QBridgeError(Exception):
    """Base class of qbridge's own errors (checkpoint and format problems)."""


class CheckpointError(QBridgeError, ValueError):
    """A checkpoint that cannot be read: missing or truncated files, a corrupt header, mismatched keys."""


class FormatError(QBridgeError, ValueError):
    """A quantization format qbridge does not know, or pieces of one that do not fit together."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an error from another library, at most ``limit`` characters, for a one-line message
    of ours (some put whole reports in their messages)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."
