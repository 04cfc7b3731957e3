"""Runs the notebooks top to bottom and stores them with their outputs (text, tables and figures), so that
they can be read without running them. Run it after changing a notebook; the test suite checks that the
stored outputs belong to the stored code:

    python notebooks/execute.py                    # all of them
    python notebooks/execute.py quickstart.ipynb   # one

Each notebook records the SHA-256 of its code cells' sources in ``metadata["qbridge"]["source_sha256"]``
and of their outputs and execution counts in ``outputs_sha256``: outputs edited or removed by hand no
longer match. Standard
error is not stored: it holds progress bars and other packages' import-time messages, which depend on the
machine; the results, tables and figures are on standard output and in display data.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent


def source_sha256(book) -> str:
    """SHA-256 over the code cells' sources, in order (what the stored outputs were made from)."""
    digest = hashlib.sha256()
    for cell in book.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode())
            digest.update(b"\0")
    return digest.hexdigest()


def outputs_sha256(book) -> str:
    """SHA-256 over the code cells' execution counts and outputs, in order."""
    digest = hashlib.sha256()
    for cell in book.cells:
        if cell.cell_type == "code":
            record = {"count": cell.execution_count, "outputs": cell.outputs}
            digest.update(json.dumps(record, sort_keys=True, default=str).encode())
            digest.update(b"\0")
    return digest.hexdigest()


def execute(path: pathlib.Path) -> None:
    import nbclient
    import nbformat

    book = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["QBRIDGE_FIGURES"] = str(pathlib.Path(tmp) / "figures")
        os.environ["QBRIDGE_ADAPTER"] = str(pathlib.Path(tmp) / "qlora-adapter")
        client = nbclient.NotebookClient(
            book,
            timeout=900,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(HERE)}},
        )
        client.execute()
    for cell in book.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    stamp = book.metadata.setdefault("qbridge", {})
    stamp["source_sha256"] = source_sha256(book)
    stamp["outputs_sha256"] = outputs_sha256(book)
    nbformat.write(book, path)


def main(names: list[str]) -> None:
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        print(f"executing {path.name}", flush=True)
        execute(path)


if __name__ == "__main__":
    main(sys.argv[1:])
