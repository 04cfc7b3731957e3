"""Fixtures the qbridge tests share."""

from __future__ import annotations

import pytest
from checkpoints import dense_llama


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory):
    """A small dense (bf16) Llama checkpoint made by transformers, shared by the session's tests."""
    path = tmp_path_factory.mktemp("dense")
    dense_llama(path)
    return path
