"""qbridge's exception family: checkpoint and format problems subclass QBridgeError."""

from __future__ import annotations


class QBridgeError(Exception):
    """Base class of qbridge's own errors (checkpoint and format problems)."""


class CheckpointError(QBridgeError, ValueError):
    """A checkpoint that cannot be read: missing or truncated files, a corrupt header, mismatched keys."""


class FormatError(QBridgeError, ValueError):
    """A quantization format qbridge does not know, or pieces of one that do not fit together."""
