"""Every notebook runs top to bottom (on the CPU here) and renders its figures, and is stored with the outputs
of its current code (``python notebooks/execute.py`` refreshes them), figures included."""

from __future__ import annotations

import base64
import importlib.util
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


def _execute_module():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_stored_with_the_outputs_of_its_code(name):
    _check_stored(nbformat.read(NOTEBOOKS / name, as_version=4), name)


def _check_stored(book, name):
    refresh = f"run `python notebooks/execute.py {name}` and commit the result"
    stamp = book.metadata.get("qbridge", {})
    execute = _execute_module()
    assert stamp.get("source_sha256") == execute.source_sha256(book), (
        f"{name}: the code changed since its outputs; {refresh}"
    )
    assert stamp.get("outputs_sha256") == execute.outputs_sha256(book), (
        f"{name}: the stored outputs are not the ones its run produced; {refresh}"
    )
    code = [c for c in book.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{name}: cells ran {counts}, not once each in order; {refresh}"
    )
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{name}: stored with an error; {refresh}"
    images = [base64.b64decode(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= len(FIGURES[name]), f"{name}: {len(images)} stored figures; {refresh}"
    for png in images:
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, f"{name}: a stored figure is no picture"


def test_the_freshness_check_catches_tampering():
    """Edited code, removed or replaced outputs and reordered runs each fail the check above."""
    import copy

    name = "quickstart.ipynb"
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    _check_stored(book, name)
    code = [i for i, c in enumerate(book.cells) if c.cell_type == "code"]
    with_output = next(i for i in code if book.cells[i].outputs)
    tampered = {
        "code edited": lambda b: setattr(b.cells[code[0]], "source", b.cells[code[0]].source + "\nx = 1"),
        "outputs removed": lambda b: setattr(b.cells[with_output], "outputs", []),
        "run out of order": lambda b: setattr(b.cells[code[0]], "execution_count", 99),
    }
    for what, change in tampered.items():
        copy_ = copy.deepcopy(book)
        change(copy_)
        with pytest.raises(AssertionError):
            _check_stored(copy_, name)
            pytest.fail(f"{what} passed")


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_and_draws(name, tmp_path, monkeypatch):
    monkeypatch.setenv("QBRIDGE_FIGURES", str(tmp_path))
    monkeypatch.setenv("QBRIDGE_ADAPTER", str(tmp_path / "qlora-adapter"))
    # the notebooks' working directories (tempfile.mkdtemp, kept for the reader to look into) under tmp_path
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
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
