"""Where the host's time goes when a jitted forward is queued: the parameter tree, the arguments, the kernels.

At one token a kept-quantized forward is bound by the host queueing it (``profile_forward.py``: kept NF4 took
0.37-0.38 ms of host time per two-layer forward against dense's 0.25). This writes NF4 and FP8 checkpoints of
``--layers`` decoder layers of Llama-3-8B's shapes (``keep_quantized.py``'s writer), loads them dense and kept
quantized into jax_side's Llama (the kept NF4 model also with the standard tables of its nested absmaxes held
as arrays, ``nested_code``, which the loader leaves out), and times on the host, at one token, for each model:

- ``flatten``: ``jax.tree.flatten`` of the model's split state, the work a jitted call does first;
- ``forward``: the compiled forward called with the state, as users call it (the call's whole host time);
- ``forward, leaves``: the same program called with the state's leaves as one list (no tree of nodes);
- ``one kernel, leaves``: a program taking the same leaves and computing one small result from the token ids
  (``keep_unused``: every argument checked and handed to XLA, one kernel launched);

then programs of one kernel taking 14 kept NF4 weights' arrays in the trees a kept model holds them in and in
plain containers (the cost of a tree's nodes), and programs of N float32[16] arguments, all used (the cost
of an argument). Every figure is host microseconds per call of ``--calls`` calls queued back to back
(results waited for after them, not timed), median of ``--rounds`` rounds; the figures alternate, one round
of each at a time, after warm-up.

    python benchmarks/forward_dispatch.py --layers 2 --out benchmarks/results/forward-dispatch-h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import torch
from flax import nnx
from keep_quantized import _forward, _ids, load_model, write_checkpoint

import jax_side
from jax_side import _qlayers
from jax_side._codes import dynamic_code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, default=2, help="decoder layers of Llama-3-8B's shapes (default 2)"
    )
    parser.add_argument("--calls", type=int, default=100, help="calls queued back to back per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per figure")
    parser.add_argument("--args", type=int, nargs="+", default=[1, 16, 64, 128, 256],
                        help="argument counts of the synthetic program")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if min(args.layers, args.calls, args.rounds, *args.args) < 1:
        parser.error("--layers, --calls, --rounds and --args must be at least 1")
    if not torch.cuda.is_available() or jax.devices()[0].platform != "gpu":
        raise SystemExit("forward_dispatch.py needs a CUDA GPU seen by torch and JAX")
    ids = _ids(1)
    calls: dict[str, object] = {}  # every figure's call; timed alternating, one round of each at a time
    leaf_counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for fmt in ("nf4", "fp8"):
            path, config, target = write_checkpoint(pathlib.Path(tmp), args.layers, fmt)
            for kept in [False, True] if fmt == "nf4" else [True]:
                name = f"kept {fmt.upper()}" if kept else "dense"
                (graphdef, state), _, _ = load_model(path, config, target, kept)
                variants = {name: state}
                if fmt == "nf4" and kept:  # the same run with the standard tables held as arrays, as before
                    variants[f"{name}, tables held"] = with_tables(state)
                for name, state in variants.items():
                    leaf_counts[name] = len(jax.tree.leaves(state))
                    for key, call in model_calls(graphdef, state, ids).items():
                        calls[f"{name}: {key}"] = call
    for key, tree in structures().items():
        fn = jax.jit(lambda tree, ids: ids.sum(), keep_unused=True).lower(tree, ids).compile()
        calls[f"{key}: one kernel"] = functools.partial(fn, tree, ids)
    for n in args.args:
        xs = [jnp.full((16,), i, jnp.float32) for i in range(n)]
        fn = jax.jit(lambda xs: functools.reduce(jnp.add, xs)).lower(xs).compile()
        calls[f"{n} float32[16] arguments, all used"] = functools.partial(fn, xs)
    for call in calls.values():  # warm-up
        jax.block_until_ready([call() for _ in range(3)])
    rounds: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(args.rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            outs = [call() for _ in range(args.calls)]
            rounds[key].append((time.perf_counter() - start) / args.calls * 1e6)
            jax.block_until_ready(outs)
    print(f"{torch.cuda.get_device_name()}, jax {jax.__version__}: {args.layers} Llama-3-8B layers, one token "
          f"({', '.join(f'{k}: {n} leaves' for k, n in leaf_counts.items())}); host us per call, median of "
          f"{args.rounds} rounds of {args.calls} calls, all figures alternating")  # fmt: skip
    results = {key: {"us": statistics.median(times), "rounds": times} for key, times in rounds.items()}
    for key, row in results.items():
        print(f"  {key:<52} {row['us']:7.1f}  [{min(row['rounds']):.1f}-{max(row['rounds']):.1f}]")
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "jax": jax.__version__, "torch": torch.__version__,
                "args": vars(args)}  # fmt: skip
        pathlib.Path(args.out).write_text(
            json.dumps({**meta, "leaves": leaf_counts, "results": results}, indent=1)
        )


def model_calls(graphdef, state, ids) -> dict[str, object]:
    """A model's calls: flattening its state, the forward called with the state, the same program called with
    the state's leaves as one list, and a program of one kernel taking the same leaves."""
    leaves, treedef = jax.tree.flatten(state)
    forward = jax.jit(functools.partial(_forward, graphdef)).lower(state, ids).compile()
    by_leaves = (
        jax.jit(lambda leaves, ids: _forward(graphdef, jax.tree.unflatten(treedef, leaves), ids))
        .lower(leaves, ids)
        .compile()
    )
    one_kernel = jax.jit(lambda leaves, ids: ids.sum(), keep_unused=True).lower(leaves, ids).compile()
    return {
        "flatten": lambda: jax.tree.flatten(state)[0],
        "forward": lambda: forward(state, ids),
        "forward, leaves": lambda: by_leaves(leaves, ids),
        "one kernel, leaves": lambda: one_kernel(leaves, ids),
    }


def with_tables(state):
    """``state`` with every nested absmax's standard table held as an array (``nested_code``), as kept
    weights held it before the loader left it out."""
    table = jnp.asarray(dynamic_code())

    def held(w):
        nested = isinstance(w, jax_side.NF4Weight) and w.nested_absmax is not None and w.nested_code is None
        return dataclasses.replace(w, nested_code=table) if nested else w

    return jax.tree.map(held, state, is_leaf=lambda x: isinstance(x, jax_side.NF4Weight))


def structures(count: int = 14) -> dict[str, object]:
    """``count`` kept NF4 weights' arrays (small: an argument costs the same at any size) in the trees a
    kept model holds them in, and as plain containers, for programs of one kernel."""
    held = _qlayers._classes()["QuantizedVariable"]
    weights = [
        jax_side.NF4Weight(
            packed=jnp.full((2048,), i, jnp.uint8),
            absmax=jnp.full((64,), i, jnp.uint8),
            nested_absmax=jnp.ones((1,), jnp.float32),
            nested_code=jnp.ones((256,), jnp.float32),
            offset=jnp.zeros((), jnp.float32),
            shape=(64, 64),
        )
        for i in range(count)
    ]
    leaves = [jax.tree.leaves(w) for w in weights]
    return {
        f"{count} arrays": [jnp.full((64, 64), i, jnp.bfloat16) for i in range(count)],
        f"{count} nnx.Param(array)": [nnx.Param(jnp.full((64, 64), i, jnp.bfloat16)) for i in range(count)],
        f"{count * 5} arrays": [x for ls in leaves for x in ls],
        f"{count} tuples of 5 arrays": [tuple(ls) for ls in leaves],
        f"{count} NF4Weight": weights,
        f"{count} NF4Weight without nested_code": [dataclasses.replace(w, nested_code=None) for w in weights],
        f"{count} QuantizedVariable(NF4Weight)": [held(w) for w in weights],
    }


if __name__ == "__main__":
    main()
