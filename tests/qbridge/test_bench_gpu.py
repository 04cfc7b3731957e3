"""qbridge bench on a CUDA card (`pytest -m gpu`): a measurement whose CUDA graph cannot be captured is
timed with events instead, and says so."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
pytest.importorskip("triton")


def test_an_uncapturable_measurement_falls_back_to_events():
    from qbridge._bench import _do_bench

    x = torch.randn(1 << 20, device="cuda")
    ms, timing = _do_bench(lambda: float(x.sum()), graph=True)  # a host sync: capture is refused
    assert timing.startswith("events (capture failed") and ms > 0
    ms, timing = _do_bench(lambda: x.mul(2.0), graph=True)
    assert timing == "graph replay" and ms > 0
    after = torch.ones(4, device="cuda").sum()  # the device is still usable
    assert float(after) == 4.0
