"""The code base is clean under ruff (lint and format) and mypy, with the settings in pyproject.toml."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_ruff_check():
    pytest.importorskip("ruff")
    done = _run("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, (
        f"ruff check found problems (`ruff check --fix .` fixes some):\n{done.stdout}{done.stderr}"
    )


def test_ruff_format():
    pytest.importorskip("ruff")
    done = _run("ruff", "format", "--check", "--no-cache", ".")
    assert done.returncode == 0, f"not formatted (run `ruff format .`):\n{done.stdout}{done.stderr}"


def test_mypy():
    pytest.importorskip("mypy")
    done = _run("mypy")
    assert done.returncode == 0, f"mypy found type errors:\n{done.stdout}{done.stderr}"
