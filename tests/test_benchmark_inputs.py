"""The benchmarks' synthetic checkpoints are ones a strict load takes as it takes a user's: their
``config.json`` builds a model of the sizes they store (a load without a target checks that)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_deepseek_v3_benchmark_checkpoint_fits_its_config(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    out = tmp_path / "result.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "deepseek_v3_scale.py"), "--tiny", "--layers", "2",
         "--experts", "4", "--device", "cpu", "--loads", "1", "--dir", str(tmp_path / "ckpt"), "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    # per layer: 4 routed experts and a shared one (3 FP8 weights with scales each), 5 FP8 attention weights
    # with scales, 4 norms, the router and its bias
    assert result["tensors"] == 2 * (5 * 3 * 2 + 5 * 2 + 4 + 2)
    assert result["loads"][0]["leaves"] == 2 * (5 * 3 + 5 + 4 + 2)
