"""Sharded loading over 8 host-platform CPU devices (sharded_cases.py, in a subprocess: JAX fixes its device
count when it starts)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("flax")
pytest.importorskip("bitsandbytes")


def test_sharded_loading_on_8_cpu_devices():
    tests = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "qbridge" / "sharded_cases.py")],
        cwd=tests.parent, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
