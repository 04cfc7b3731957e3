"""The background-compile bookkeeping (torch_side._compile) on the CPU: modes, argument specializations,
and a forked child that starts clean. The compiles themselves: test_triton_compile.py (CPU, for sm_90)
and test_compile_gpu.py (GPU)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from torch_side import _compile


def test_the_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("QBRIDGE_TRITON_COMPILE", raising=False)
    assert _compile.compile_mode() == "background"
    monkeypatch.setenv("QBRIDGE_TRITON_COMPILE", "wait")
    assert _compile.compile_mode() == "wait"
    monkeypatch.setenv("QBRIDGE_TRITON_COMPILE", "later")
    with pytest.raises(ValueError, match=r"QBRIDGE_TRITON_COMPILE must be one of \('background', 'wait'\)"):
        _compile.compile_mode()
    # a misspelt value fails at import: later it would surface inside a checkpoint load as a damaged file
    env = {**os.environ, "QBRIDGE_TRITON_COMPILE": "later"}
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", "import torch_side"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "QBRIDGE_TRITON_COMPILE must be one of" in done.stderr


def test_argument_specializations():
    data = torch.zeros(64, dtype=torch.uint8)
    assert _compile.arg_spec(data) == ("t", torch.uint8, data.data_ptr() % 16 == 0)
    assert _compile.arg_spec(data[1:])[2] is False  # 1 byte off 16-byte alignment
    assert _compile.arg_spec(1) == ("i", True, False, "i32")
    assert _compile.arg_spec(32) == ("i", False, True, "i32")
    assert _compile.arg_spec(2**31) == ("i", False, True, "i64")
    assert _compile.arg_spec(2**63) == ("i", False, True, "u64")
    assert _compile.arg_spec(0.5) == ("f",)
    with pytest.raises(TypeError, match="no Triton specialization known for an argument of type str"):
        _compile.arg_spec("x")


FORK = r"""
import os
from torch_side import _compile
_compile._REQUESTED.add(("a variant",))
_compile._WORKING = 3  # as if three compiles were under way in this process
pid = os.fork()
if pid == 0:
    clean = not _compile._REQUESTED and _compile._WORKING == 0 and _compile._WORKER is None
    os._exit(0 if clean and _compile.wait_for_kernels(timeout=5) else 1)
_, status = os.waitpid(pid, 0)
print("CHILD", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_with_nothing_under_way():
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", FORK], cwd=root, capture_output=True, text=True, timeout=300)
    assert "CHILD 0" in done.stdout, done.stdout + done.stderr[-3000:]


def test_no_background_thread_means_the_work_is_done_on_the_callers_thread(monkeypatch):
    """If no thread can be started (a thread limit, interpreter shutdown), nothing is left half asked:
    the variant is marked for the caller's thread, and wait_for_kernels has nothing to wait for."""
    monkeypatch.setattr(_compile, "_FAILED", set())
    monkeypatch.setattr(_compile, "_REQUESTED", set())
    monkeypatch.setattr(_compile, "_WORKER", None)

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_compile.threading.Thread, "start", refuse)
    before = _compile._WORKING
    assert _compile._request(("a variant",), None, (), {}, 0) is False
    assert ("a variant",) in _compile._FAILED and ("a variant",) not in _compile._REQUESTED
    assert _compile._WORKING == before and _compile.wait_for_kernels(timeout=1)


FORK_DURING_IMPORT = r"""
import os, signal, sys, time
from torch_side import _compile
try:
    _compile.kernels_imported(False)  # the background thread starts importing Triton and the kernels
except _compile.KernelNotReady:
    pass
deadline = time.monotonic() + 60
while "triton.language" not in sys.modules and time.monotonic() < deadline:  # the import under way
    time.sleep(0.001)
pid = os.fork()  # waits for that import to finish
if pid == 0:
    signal.alarm(60)  # a child stuck on a half-imported module's lock dies here
    import triton
    import torch_side._triton
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("CHILD", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_during_the_background_import_leaves_the_child_able_to_import():
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", FORK_DURING_IMPORT], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert "CHILD 0" in done.stdout, done.stdout + done.stderr[-3000:]
