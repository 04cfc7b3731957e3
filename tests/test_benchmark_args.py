"""The GPU benchmarks refuse bad ``--variants`` before any work (a bad setting used to fail only after the
weights were built, on the GPU machine's time)."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
fused_matmul_mosaic = pytest.importorskip("fused_matmul_mosaic")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("_one_row=2", "_one_row is a switch: 0 or 1, got 2"),
        ("_TILE=0", "_TILE is a size: at least 1, got 0"),
        ("MAX_ROWS=-4", "MAX_ROWS is a size: at least 1, got -4"),
        ("_nope=1", "jax_side._mosaic has no setting '_nope'"),
        ("_BLOCKS=x", "_BLOCKS takes an integer, got 'x'"),
        ("_BLOCKS", "each setting is NAME=INT, got '_BLOCKS'"),
    ],
)
def test_bad_variants_are_refused(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fused_matmul_mosaic.parse_variant(spec)


def test_good_variants_parse():
    assert fused_matmul_mosaic.parse_variant("") == []
    assert fused_matmul_mosaic.parse_variant("_one_row=1,MAX_ROWS=32") == [("_one_row", 1), ("MAX_ROWS", 32)]


def test_settings_a_script_ignores_are_refused():
    import argparse

    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        fused_matmul_mosaic.check_variants(
            parser, ["", "_one_row=1"], ignored={"_one_row": "is not timed here"}
        )
    fused_matmul_mosaic.check_variants(parser, ["", "_BLOCKS=8"], ignored={"_one_row": "is not timed here"})


def test_too_few_in_process_loads_are_refused_before_any_work(monkeypatch, capsys):
    """``fresh_process_raw_route.py`` leaves each route's first in-process load out: ``--loads 1`` used to fail
    only after minutes of fresh processes, losing their results."""
    fresh_process_raw_route = pytest.importorskip("fresh_process_raw_route")
    monkeypatch.setattr(
        fresh_process_raw_route, "write_checkpoint", lambda *a: pytest.fail("work started before the check")
    )
    monkeypatch.setattr(sys, "argv", ["fresh_process_raw_route.py", "--loads", "1"])
    with pytest.raises(SystemExit):
        fresh_process_raw_route.main()
    assert "--loads must be at least 2" in capsys.readouterr().err


def test_an_ab_run_without_a_base_tree_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """``in_process_ab.py --base`` must hold a qbridge tree; a wrong folder fails at once, not after the
    checkpoints are written."""
    in_process_ab = pytest.importorskip("in_process_ab")
    monkeypatch.setattr(sys, "argv", ["in_process_ab.py", "--base", str(tmp_path)])
    with pytest.raises(SystemExit):
        in_process_ab.main()
    assert f"--base {tmp_path}: no qbridge/__init__.py there" in capsys.readouterr().err


def test_the_forward_floor_counts_the_kept_weights_bytes_and_keeps_the_rest():
    """``forward_floor.py`` replaces the Mosaic kernels' time by the kept weights' bytes at the ceiling: its
    bytes per layer are what jax_side's own weights of those shapes hold, and every other kernel's time stays."""
    import jax.numpy as jnp
    import numpy as np

    import jax_side

    forward_floor = pytest.importorskip("forward_floor")
    nf4 = fp8 = 0
    for n, k in forward_floor.PROJECTIONS:
        blocks = n * k // 64
        nf4 += jax_side.quantized_nbytes(
            jax_side.NF4Weight(
                packed=jnp.zeros(n * k // 2, jnp.uint8), absmax=jnp.zeros(blocks, jnp.uint8),
                nested_absmax=jnp.zeros(-(-blocks // 256), jnp.float32), offset=jnp.zeros((), jnp.float32),
                shape=(n, k),
            )
        )[0]  # fmt: skip
        scales = jnp.zeros((-(-n // 128), -(-k // 128)), jnp.float32)
        fp8 += jax_side.quantized_nbytes(jax_side.FP8Weight(jnp.zeros((n, k), jnp.float8_e4m3fn), scales))[0]
    assert (forward_floor.layer_bytes("NF4"), forward_floor.layer_bytes("FP8")) == (nf4, fp8)

    kernels = [{"name": "body_mosaic_gpu_kernel", "us": 150.0}, {"name": "gemm_fusion_dot", "us": 60.0}]
    profile = {
        "args": {"layers": 2},
        "results": {
            "dense, 16 tokens": {"busy_us": 400.0, "by_name": [{"name": "gemm_fusion_dot_3", "us": 300.0}]},
            "kept FP8, 16 tokens": {"busy_us": 250.0, "by_name": kernels},
            "kept NF4, 1 token": {
                "busy_us": 300.0,
                "by_name": [{"name": "input_reduce_fusion", "us": 200.0}],
            },
        },
    }
    (row,) = forward_floor.floors(profile, ceiling=1e12)  # one token has no Mosaic kernel: left out
    at_ceiling = 2 * fp8 / 1e12 * 1e6
    assert row["weights_at_ceiling_us"] == pytest.approx(at_ceiling)
    assert row["floor_us"] == pytest.approx(250.0 - 150.0 + at_ceiling)
    assert row["floor_over_dense"] == pytest.approx((100.0 + at_ceiling) / 400.0)
    assert np.isclose(row["busy_over_dense"], 250.0 / 400.0)


def test_a_knobs_run_without_a_layer_is_refused_before_any_work(monkeypatch, capsys):
    tiny_deepseek_knobs = pytest.importorskip("tiny_deepseek_knobs")
    monkeypatch.setattr(sys, "argv", ["tiny_deepseek_knobs.py", "--layers", "0"])
    with pytest.raises(SystemExit):
        tiny_deepseek_knobs.main()
    assert "--layers must be at least 1, got 0" in capsys.readouterr().err
