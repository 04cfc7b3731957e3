"""The documentation builds with every warning an error: broken references, reST mistakes in docstrings,
README sections the guides include that went missing, and public names without a docstring."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_strictly(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-E", "-b", "html",
         str(ROOT / "docs"), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"the documentation build failed:\n{done.stdout}{done.stderr}"
    pages = {  # each guide holds the README section it includes
        "quickstart": "Run the test suite",
        "checkpoints": "How tensors are classified",
        "handoff": "Arrays you keep for many jitted calls",
        "keep_quantized": "Keeping weights quantized",
        "parity": "first_divergence",
        "performance": "Copy ceiling",
    }
    for page, phrase in pages.items():
        assert phrase in (tmp_path / "html" / f"{page}.html").read_text(), f"{page}.html lacks {phrase!r}"
    api = (tmp_path / "html" / "api" / "qbridge.html").read_text()
    assert 'id="qbridge.load_checkpoint"' in api and 'id="qbridge.to_jax"' in api


def test_the_docstring_check_sees_every_kind_of_public_name(tmp_path, monkeypatch):
    """A dataclass with only its generated signature, a cached function and a cached property count as
    undocumented."""
    import importlib.util

    (tmp_path / "planted.py").write_text(
        "import dataclasses, functools\n"
        "__all__ = ['Plain', 'cached', 'Holder', 'fine']\n"
        "@dataclasses.dataclass\nclass Plain:\n    x: int\n"
        "@functools.cache\ndef cached(x):\n    return x\n"
        "class Holder:\n    '''Documented.'''\n    @functools.cached_property\n    def value(self):\n        return 1\n"
        "def fine():\n    '''Documented.'''\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("docs_conf", ROOT / "docs" / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    missing = conf._missing_docstrings(("planted",))
    assert sorted(missing) == ["planted.Holder.value", "planted.Plain", "planted.cached"], missing
