"""A group's reads from Python against torch_side's library's ``qb_read_ranges``, alone and beside a busy thread.

``Checkpoint.read_stacked`` of one tiny DeepSeek-V3 layer's 256 up projections (``deepseek_v3_scale.py --tiny``:
32 KiB each, 64 KiB apart, the other two projections between them), read with the library (one call per file,
no GIL held) and from Python (one positioned read per tensor, each giving the GIL up and taking it back),
alternating (five reads of the group each time), ``--rounds`` times, first alone, then while another thread runs Python code without pause (as a
load's thread does while its reading threads read). Prints microseconds per tensor read (median [range]) and
how much work the busy thread got done per second meanwhile. Runs on any machine with a C compiler (no GPU).

    python benchmarks/read_ranges_contended.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import threading
import time

REPEAT = 5  # reads of the group per measurement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import deepseek_v3_scale
    import torch

    from qbridge._checkpoint import open_checkpoint
    from torch_side import _native

    read = _native.read_ranges(wait=True)
    if read is None:
        parser.error("torch_side's library did not load here (see the log): its reads are what this compares")
    deepseek_v3_scale.use_tiny_shapes()
    stop, done = threading.Event(), [0]

    def busy() -> None:
        while not stop.is_set():
            x = 0
            for i in range(1000):
                x += i
            done[0] += 1

    with tempfile.TemporaryDirectory(prefix="qbridge-read-ranges-") as tmp:
        root = pathlib.Path(tmp)
        deepseek_v3_scale.write_checkpoint(root, 1, 256, "cpu")
        with open_checkpoint(root) as ckpt:
            keys = sorted(k for k in ckpt.source.shapes if ".experts." in k and k.endswith("up_proj.weight"))
            assert len(keys) == 256, len(keys)
            want = ckpt.read_stacked(keys)
            for contended in (False, True):
                worker = threading.Thread(target=busy, daemon=True) if contended else None
                if worker is not None:
                    stop.clear()
                    worker.start()
                times: dict[str, list[float]] = {"library": [], "Python": []}
                work: dict[str, list[float]] = {"library": [], "Python": []}
                for _ in range(args.rounds):
                    for label in times:
                        _native._READ = read if label == "library" else None
                        before, t = done[0], time.perf_counter()
                        for _ in range(REPEAT):
                            got = ckpt.read_stacked(keys)
                        spent = time.perf_counter() - t
                        times[label].append(spent / REPEAT / len(keys) * 1e6)
                        work[label].append((done[0] - before) / spent)
                        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
                _native._READ = read
                if worker is not None:
                    stop.set()
                    worker.join()
                for label, us in times.items():
                    print(f"{'beside a busy thread' if contended else 'alone':20s} {label:8s} "
                          f"{statistics.median(us):8.1f} us per tensor [{min(us):.1f}-{max(us):.1f}]"
                          + (f"  busy thread: {statistics.median(work[label]):.0f} units/s" if contended else ""))  # fmt: skip


if __name__ == "__main__":
    main()
