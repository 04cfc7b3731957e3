"""Repeated in-process loads with two versions of qbridge, alternating fresh processes on one machine.

Writes two checkpoints once: N decoder layers with Llama-3-8B's linear shapes in nested NF4
(``fresh_process_raw_route.py``) and one DeepSeek-V3 MoE layer at tiny shapes (``deepseek_v3_scale.py
--tiny``: its wall time is host work). Then ``--rounds`` times, one fresh process per version, the base
first: each process imports qbridge from its tree (its working directory) and loads each checkpoint
``--loads`` times to ready arrays, printing the median without the first four. Before those loads each
process loads both checkpoints once and waits for the Triton kernels they asked for
(``torch_side.wait_for_kernels``): until a kernel is ready (about 1.3 s into a process on an H200 host,
about 0.5 s of it Triton loading the kernel from its cache), calls decode on the exact torch path, and a
load then took 1.5-3x as long, so a median over loads in both states measured mostly when the kernel
became ready (``benchmarks/RESULTS.md``). The floor of the NF4
checkpoint (8-thread page-cache read, 4 MiB at a time, against pinned host-to-device copies, the slower of
the two) is measured once, before the rounds.

Make the base tree with ``git archive``, e.g. for the last commit::

    mkdir /tmp/base && git archive HEAD qbridge torch_side jax_side | tar -x -C /tmp/base
    python benchmarks/in_process_ab.py --base /tmp/base [--rounds 5] [--layers 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

CHILD = r"""
import statistics, sys, time
import jax, qbridge, torch_side
loads = int(sys.argv[3])
times = {}
t0 = time.perf_counter()
for path in sys.argv[1:3]:  # each checkpoint once: the kernels it needs are asked for
    jax.block_until_ready(qbridge.load_checkpoint(path, device=sys.argv[4], progress=False))
torch_side.wait_for_kernels()  # the steady state: no load below decodes on the stand-in path
ready = time.perf_counter() - t0
for name, path in (("nf4", sys.argv[1]), ("tiny_deepseek_layer", sys.argv[2])):
    ts = []
    for _ in range(loads):
        t0 = time.perf_counter()
        jax.block_until_ready(qbridge.load_checkpoint(path, device=sys.argv[4], progress=False))
        ts.append(time.perf_counter() - t0)
    times[name] = statistics.median(ts[4:])
print("RESULT", qbridge.__file__, times["nf4"], times["tiny_deepseek_layer"], ready)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", required=True, help="a tree holding the base version's qbridge, torch_side, jax_side"
    )
    parser.add_argument("--rounds", type=int, default=5, help="processes per version (default 5)")
    parser.add_argument("--loads", type=int, default=14, help="loads per checkpoint and process (default 14)")
    parser.add_argument("--layers", type=int, default=4, help="NF4 decoder layers (default 4)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    base, here = pathlib.Path(args.base).resolve(), pathlib.Path(__file__).resolve().parents[1]
    if not (base / "qbridge" / "__init__.py").is_file():
        parser.error(
            f"--base {args.base}: no qbridge/__init__.py there (make it with git archive, see --help)"
        )
    if args.rounds < 1 or args.loads < 5:
        parser.error("--rounds must be at least 1 and --loads at least 5 (the first four loads are left out)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda (the default): torch sees no CUDA GPU here; use --device cpu")
    sys.path.insert(0, str(here / "benchmarks"))
    import deepseek_v3_scale as ds
    import fresh_process_raw_route as raw_route

    with tempfile.TemporaryDirectory(prefix="qbridge-ab-") as tmp:
        nf4, tiny = pathlib.Path(tmp) / "nf4", pathlib.Path(tmp) / "tiny"
        nf4.mkdir()
        tiny.mkdir()
        raw_route.write_checkpoint(nf4, args.layers, 1, args.device)
        ds.use_tiny_shapes()
        ds.write_checkpoint(tiny, 1, 256, args.device)
        file = nf4 / "model.safetensors"
        ds.read_bandwidth([file], 8, 4 << 20)  # into the page cache
        read8 = ds.read_bandwidth([file], 8, 4 << 20)
        copy = ds.pinned_copy_bandwidth() if args.device == "cuda" else None
        floor = file.stat().st_size / (min(read8, copy) if copy is not None else read8)
        print(f"NF4 checkpoint {file.stat().st_size / 1e9:.2f} GB: floor {floor * 1e3:.1f} ms (page cache "
              f"{read8 / 1e9:.1f} GB/s with 8 threads" + (f", pinned copies {copy / 1e9:.1f} GB/s)" if copy else ")"),
              flush=True)  # fmt: skip
        rows = []
        for _ in range(args.rounds):
            for version, tree in (("base", base), ("this", here)):
                env = {
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
                }
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, str(nf4), str(tiny), str(args.loads), args.device],
                    env=env, cwd=tree, capture_output=True, text=True, timeout=900,
                )  # fmt: skip
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT")]
                if done.returncode or not line:
                    raise RuntimeError(f"the {version} process failed: {done.stderr.strip()[-2000:]}")
                _, imported, nf4_s, tiny_s, ready_s = line[0].split()
                if not pathlib.Path(imported).resolve().is_relative_to(tree):
                    raise RuntimeError(
                        f"the {version} process imported qbridge from {imported}, not from {tree}"
                    )
                rows.append({"version": version, "nf4_s": float(nf4_s), "tiny_deepseek_layer_s": float(tiny_s),
                             "first_loads_and_kernels_s": float(ready_s)})  # fmt: skip
                print(f"{version:5s} NF4 {float(nf4_s) * 1e3:6.1f} ms ({float(nf4_s) / floor:.2f}x the floor)   "
                      f"tiny DeepSeek-V3 layer {float(tiny_s) * 1e3:6.1f} ms   (first loads, kernels ready: {float(ready_s):.2f} s)",
                      flush=True)  # fmt: skip
    for key in ("nf4_s", "tiny_deepseek_layer_s"):
        pairs = [this[key] / b[key] for b, this in zip(rows[::2], rows[1::2], strict=True)]
        print(f"{key[:-2]}: this / base per round {', '.join(f'{r:.2f}' for r in pairs)}")
    if args.out:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        result = {"device": device, "torch": torch.__version__, "floor_s": floor, "rows": rows}
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
