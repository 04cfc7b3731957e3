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
