"""Every notebook runs top to bottom (on the CPU here) and renders its figures; committed notebooks carry no
outputs."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
FIGURES = {
    "quickstart.ipynb": ["quickstart_errors.png"],
    "fp8_and_torchao.ipynb": ["fp8_block_error.png"],
    "performance.ipynb": ["performance.png"],
    "parity_debugging.ipynb": ["parity_trace.png"],
    "qlora.ipynb": ["qlora_loss.png"],
}


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_committed_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{name}: strip the outputs before committing"
            )


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_and_draws(name, tmp_path, monkeypatch):
    monkeypatch.setenv("QBRIDGE_FIGURES", str(tmp_path))
    monkeypatch.setenv("QBRIDGE_ADAPTER", str(tmp_path / "qlora-adapter"))
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError on any error
    for figure in FIGURES[name]:
        png = tmp_path / figure
        assert png.exists(), f"{name} did not write {figure}"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{figure} is empty or not a picture"
