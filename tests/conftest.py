"""Shared pytest setup: the ``gpu`` marker and the devices every tensor test runs on."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# JAX must not take 75 % of the card that torch shares with it in the GPU tests.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# What qbridge remembers between processes (models built on the meta device, the CPU kernel) stays inside
# the test run, and goes with it.
if "QBRIDGE_CACHE_DIR" not in os.environ:
    os.environ["QBRIDGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="qbridge-test-cache-")
    atexit.register(shutil.rmtree, os.environ["QBRIDGE_CACHE_DIR"], ignore_errors=True)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the default, see ``pyproject.toml``): one process per core this process may run on, 4 at
    most (each imports torch and JAX); an explicit ``-n N`` gives N."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


def _cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter (set before triton loads).
if not _cuda_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    """CPU 4-bit calls take qbridge's C kernel once it is built (in the background, torch path meanwhile):
    built before the tests, every CPU test of dequantize exercises that kernel, not whichever was ready."""
    try:
        from torch_side import _native
    except ImportError:  # a jax-only environment
        pass
    else:
        _native.cpu_4bit(wait=True)
    try:
        import jax_side
    except ImportError:  # a torch-only environment
        return
    jax_side.wait_for_kernels()  # the same for jax_side's CPU decode (tests of XLA's operations pick them)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_visible():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Tests that take a `device` argument run on the CPU everywhere and on CUDA under the gpu marker.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param
