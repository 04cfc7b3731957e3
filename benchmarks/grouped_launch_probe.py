"""Would one kernel launch per group of weights that share x (q/k/v, gate/up) make a kept forward faster?

A probe before building it: the decoder layers' matmuls of Llama-3-8B's shapes (q 4096, k 1024, v 1024, o
4096, gate 14336, up 14336 rows of 4096; down 4096 rows of 14336), chained the way a layer chains them
(attention itself replaced by a sum, so that only the matmuls and their neighbours run), jitted over the
weights as arguments, in three forms with random weights made in JAX:

* ``dense``: bfloat16 kernels ``[in, out]``, ``x @ W`` in XLA (the baseline);
* ``separate``: kept NF4 (nested absmax) or FP8 (128x128 block scales) weights, one
  ``jax_side.quantized_matmul`` per weight: 7 kernel launches a layer;
* ``grouped``: the same formats with q/k/v stored as one ``[6144, 4096]`` weight and gate/up as one
  ``[28672, 4096]``: 4 launches a layer, the same bytes read (the launch count a grouped kernel would have).

Per forward, medians over rounds with the forms alternating: back to back (``--calls`` forwards queued, each
feeding the next, one wait), each waited for, and the host's time to queue one. Ratios are against dense in
the same round::

    python benchmarks/grouped_launch_probe.py --layers 4 --tokens 16 128 --rounds 5 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from fused_matmul import fp8_weight, nf4_weight

import jax_side

HIDDEN, INTER, Q, KV = 4096, 14336, 4096, 1024
SEPARATE = {"q": (Q, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, Q),
            "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}  # fmt: skip
GROUPED = {
    "qkv": (Q + 2 * KV, HIDDEN),
    "o": (HIDDEN, Q),
    "gate_up": (2 * INTER, HIDDEN),
    "down": (HIDDEN, INTER),
}


def make(form: str, fmt: str, layers: int, rng: np.random.Generator) -> list[dict]:
    shapes = GROUPED if form == "grouped" else SEPARATE
    out = []
    for _ in range(layers):
        if form == "dense":
            w = {k: jnp.asarray(rng.standard_normal((i, o), np.float32) * 0.02, jnp.bfloat16)
                 for k, (o, i) in shapes.items()}  # fmt: skip
        else:
            maker = nf4_weight if fmt == "nf4" else fp8_weight
            w = {k: maker(rng, o, i) for k, (o, i) in shapes.items()}
        out.append(w)
    return out


def mm(x: jax.Array, w) -> jax.Array:
    if isinstance(w, jax.Array):
        return x @ w
    return jax_side.quantized_matmul(x, w)


def forward(h: jax.Array, params: list[dict]) -> jax.Array:
    for w in params:
        if "qkv" in w:
            q, k, v = jnp.split(mm(h, w["qkv"]), [Q, Q + KV], axis=-1)
        else:
            q, k, v = mm(h, w["q"]), mm(h, w["k"]), mm(h, w["v"])
        a = q + jnp.tile(k + v, 4)  # attention's place: something of q, k and v
        h = h + mm(a, w["o"])
        if "gate_up" in w:
            g, u = jnp.split(mm(h, w["gate_up"]), 2, axis=-1)
        else:
            g, u = mm(h, w["gate"]), mm(h, w["up"])
        h = h + mm(jax.nn.silu(g) * u, w["down"])
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h.astype(jnp.float32)), -1, keepdims=True)).astype(h.dtype)
    return h


def timed(fn, params, h, calls: int) -> tuple[float, float, float]:
    """ms per forward: back to back (each feeding the next), each waited for, the host's queueing."""
    jax.block_until_ready(fn(h, params))
    start = time.perf_counter()
    x = h
    for _ in range(calls):
        x = fn(x, params)
    queued = time.perf_counter() - start
    jax.block_until_ready(x)
    back = time.perf_counter() - start
    waits = []
    for _ in range(10):
        s = time.perf_counter()
        jax.block_until_ready(fn(h, params))
        waits.append(time.perf_counter() - s)
    return back / calls * 1e3, statistics.median(waits) * 1e3, queued / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--formats", nargs="+", default=["nf4", "fp8"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    fn = jax.jit(forward)
    models = {"dense": make("dense", "", args.layers, rng)}
    for fmt in args.formats:
        for form in ("separate", "grouped"):
            models[f"{fmt} {form}"] = make(form, fmt, args.layers, rng)
    xs = {t: jnp.asarray(rng.standard_normal((t, HIDDEN), np.float32), jnp.bfloat16) for t in args.tokens}
    rows: dict[str, dict] = {}
    for _ in range(args.rounds):
        for t in args.tokens:
            for name, params in models.items():
                back, waited, queued = timed(fn, params, xs[t], args.calls)
                row = rows.setdefault(f"{name}, {t} tokens", {"back": [], "waited": [], "queued": []})
                row["back"].append(back)
                row["waited"].append(waited)
                row["queued"].append(queued)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {args.layers} layers of Llama-3-8B matmuls, "
          f"median of {args.rounds} rounds, ms per forward")  # fmt: skip
    for key, row in rows.items():
        for k in ("back", "waited", "queued"):
            row[k + "_ms"] = statistics.median(row[k])
        t = key.split(", ")[1]
        d = rows[f"dense, {t}"]
        row["back_vs_dense"] = statistics.median(b / db for b, db in zip(row["back"], d["back"]))
        print(f"  {key:<26} back to back {row['back_ms']:.3f} [{min(row['back']):.3f}-{max(row['back']):.3f}] "
              f"({row['back_vs_dense']:.2f}x dense)  waited {row['waited_ms']:.3f}  queued {row['queued_ms']:.3f}")  # fmt: skip
    if args.out:
        meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "args": vars(args)}
        pathlib.Path(args.out).write_text(json.dumps({**meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
