"""``qbridge bench``'s table formats the results it writes now and those of earlier runs kept in
benchmarks/results (their process rows lack the later columns)."""

from __future__ import annotations

import copy
import json
import pathlib

from qbridge._bench import format_bench

STORED = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bench-quick-h200.json"


def test_stored_and_current_results_format():
    earlier = json.loads(STORED.read_text())
    text = format_bench(earlier)
    assert "whole process (empty Triton cache)" in text and "next 100 calls" not in text
    current = copy.deepcopy(earlier)
    for row in current["process"]:
        row["next_100_calls_s"] = 0.0125
    assert "first call 0.512 s, next 100 calls 0.013 s)" in format_bench(current)
