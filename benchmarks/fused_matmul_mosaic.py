"""The Mosaic GPU kernel (``jax_side._mosaic``) against the Pallas Triton kernel and a dense bf16 ``x @ W`` in
XLA, per layer on Llama-3-8B shapes, with ``fused_matmul.py``'s weights and loop: FP8 (block 128) as
``quantized_matmul`` runs it, and NF4 with other decodes of the nibbles in the kernel's place:

- ``prmt``: four 16-entry float32 lookups per 24 instructions, 20 of them byte permutes;
- ``products`` (in use): each row's 16 products ``round(code[j] * absmax)`` made once per absmax block and looked up
  by byte permutes (12 instructions per four elements, no multiply or rounding per element);
- ``select``: a tree of 15 selects per nibble;
- ``none``: ``nibble - 8`` (wrong values; the time of everything else in the kernel, a bound).

Needs a Hopper GPU and a JAX whose Pallas has the Mosaic GPU lowering::

    python benchmarks/fused_matmul_mosaic.py --out benchmarks/results/fused-matmul-mosaic-h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fused_matmul as fm

import jax_side
from jax_side import _mosaic
from jax_side._codes import standard_code

NF4 = standard_code("nf4")


def _select(v, table):
    """``table[v]`` for int32 ``v`` in [0, 16): a tree of 15 selects."""
    level = [jnp.float32(t) for t in table]
    bit = 1
    while len(level) > 1:
        c = (v & bit) != 0
        level = [jnp.where(c, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
        bit *= 2
    return level[0]


def decoder(kind: str, dtype, table=NF4):
    """``(hi, lo) = decode(q, scale)`` for ``_mosaic.kernel``: ``"select"`` or ``"none"`` (see above), for up
    to 32 rows of x (one absmax block per MMA)."""

    def decode(q, *scales):
        if len(scales) != 1:
            raise ValueError(f"the {kind!r} decode takes one absmax block per MMA: up to 32 rows of x")
        v = q.astype(jnp.int32)
        value = (lambda n: (n - 8).astype(jnp.float32)) if kind == "none" else (lambda n: _select(n, table))
        return (value(v >> 4) * scales[0]).astype(dtype), (value(v & 15) * scales[0]).astype(dtype)

    return decode


def reference(x, q, absmax_t, table=NF4):
    """The same product in float32 from the dense weight decoded by XLA (rounded to ``x.dtype`` first)."""
    n = q.shape[0]
    tab = jnp.asarray(table, jnp.float32)
    hi = tab[(q >> 4).astype(jnp.int32)]
    lo = tab[(q & 15).astype(jnp.int32)]
    w = jnp.stack([hi, lo], -1).reshape(n, -1)  # [n, k]
    a = jnp.repeat(absmax_t.T, 64, axis=1)
    w = (w * a).astype(x.dtype).astype(jnp.float32)
    return jnp.dot(x.astype(jnp.float32), w.T, precision="highest")


def mosaic(decode: str):
    """``fn(x, w)`` for ``fused_matmul.time_per_matmul``: the absmax decode included in the time (a nested
    absmax handed over as stored: decoded by the kernel, or by XLA first under ``--variants
    _nested_in_kernel=0``)."""

    def fn(x, w):
        q, a = _mosaic._stored(w)
        other = None if decode in ("prmt", "products") else decoder(decode, x.dtype)
        before, _mosaic._products = _mosaic._products, decode == "products"  # read when the kernel is traced
        try:
            return _mosaic.kernel(x, q, a, table=NF4, decode=other)
        finally:
            _mosaic._products = before

    return fn


def triton(x, w):
    """The Pallas Triton kernel, as ``quantized_matmul`` ran it off Hopper."""
    _mosaic._force = False
    try:
        return fm.fused(x, w)
    finally:
        _mosaic._force = None


def settings() -> list[str]:
    """The settings of ``jax_side._mosaic`` a variant may change: its module-level integers and switches."""
    return [name for name, value in _mosaic.settings() if isinstance(value, int)]


def parse_variant(spec: str) -> list[tuple[str, int]]:
    """``"NAME=INT,..."`` as ``[(NAME, INT), ...]`` (``""``: none).

    Raises:
        ValueError: a part without ``=``, a name that is not one of :func:`settings`, a value not an integer,
            a switch (a bool setting) given other than 0 or 1, a size (an int setting) below 1.
    """
    pairs = []
    for part in (p for p in spec.split(",") if p):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"each setting is NAME=INT, got {part!r}")
        if name not in settings():
            raise ValueError(
                f"jax_side._mosaic has no setting {name!r}; its settings: {', '.join(settings())}"
            )
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{name} takes an integer, got {value!r}") from None
        if isinstance(getattr(_mosaic, name), bool) and number not in (0, 1):
            raise ValueError(f"{name} is a switch: 0 or 1, got {number}")
        if not isinstance(getattr(_mosaic, name), bool) and number < 1:
            raise ValueError(f"{name} is a size: at least 1, got {number}")
        pairs.append((name, number))
    return pairs


def check_variants(
    parser: argparse.ArgumentParser, specs: list[str], ignored: dict[str, str] | None = None
) -> None:
    """Refuses (``parser.error``) a ``--variants`` entry :func:`parse_variant` refuses, or one that sets a name
    of ``ignored`` (name -> why the script ignores it), before any work."""
    for spec in specs:
        try:
            names = [name for name, _ in parse_variant(spec)]
        except ValueError as e:
            parser.error(f"--variants {spec!r}: {e}")
        for name in names:
            if name in (ignored or {}):
                parser.error(f"--variants {spec!r}: {name} {ignored[name]}")


@contextlib.contextmanager
def variant(spec: str):
    """``jax_side._mosaic``'s settings ``NAME=INT,...`` while a kernel is traced (and checked), then restored."""
    pairs = parse_variant(spec)
    before = {name: getattr(_mosaic, name) for name, _ in pairs}
    for name, value in pairs:
        setattr(_mosaic, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(_mosaic, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the rows here as JSON")
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[16], help="rows of x, 1 to 128 (default 16)"
    )
    parser.add_argument("--decodes", nargs="+", default=["prmt", "products", "select", "none"],
                        choices=["prmt", "products", "select", "none"],
                        help="NF4 decodes of the nibbles to time (default all; select and none up to 32 rows)")  # fmt: skip
    parser.add_argument("--formats", nargs="+", default=["NF4", "FP8"], choices=["NF4", "FP8"])
    parser.add_argument("--parts", action="store_true",
                        help="NF4: also time the kernel (product tables) on an absmax decoded to float32 before the loop, "
                             "as if a kept weight held it so: a call without its nested-absmax decode")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=[""],
                        help="settings of jax_side._mosaic to time the kernel under, each a comma-separated list "
                             "of NAME=INT (e.g. _BLOCKS=8,_FP8_BLOCKS=4); '' is the module as it is")  # fmt: skip
    args = parser.parse_args()
    if bad := [t for t in args.tokens if not 1 <= t <= 128]:
        parser.error(f"--tokens: 1 to 128 rows of x, got {bad}")
    # the kernels are called directly here: what quantized_matmul hands them is profile_forward.py's to time
    passed_over = (
        "changes only which calls quantized_matmul hands the kernel, and this script calls it directly"
    )
    check_variants(parser, args.variants, ignored={"MAX_ROWS": passed_over, "_one_row": passed_over})
    if (why := _mosaic._unavailable()) is not None:
        raise SystemExit(f"fused_matmul_mosaic.py: {why}")
    if not _mosaic._hopper():
        raise SystemExit("fused_matmul_mosaic.py needs a Hopper GPU (compute capability 9.x); this process has "
                         f"{[d.device_kind for d in jax.devices()]}")  # fmt: skip
    rng = np.random.default_rng(0)
    refused: dict[str, set[str]] = {"NF4": set(), "FP8": set()}  # variants a check refused: not timed
    for spec in args.variants if "FP8" in args.formats else ():
        for n, k in fm.SHAPES:
            try:
                w = jax.eval_shape(lambda n=n, k=k: jax_side.FP8Weight(
                    jnp.zeros((n, k), jnp.float8_e4m3fn), jnp.ones((-(-n // 128), -(-k // 128)))))  # fmt: skip
                with variant(spec):
                    jax.jit(lambda x, w: _mosaic.fp8_matmul(x, w)).trace(  # a new function: traced again
                        jax.ShapeDtypeStruct((16, k), jnp.bfloat16), w).lower(
                        lowering_platforms=("cuda",))  # fmt: skip
            except Exception as e:
                print(f"check FP8 {n}x{k} {spec}: refused ({type(e).__name__}: {e})", flush=True)
                refused["FP8"].add(spec)
    for n, k, t in [(4096, 4096, 16), (192, 768, 3)]:
        w = fm.nf4_weight(rng, n, k)
        x = jnp.asarray(rng.standard_normal((t, k), dtype=np.float32)).astype(jnp.bfloat16)
        want = np.asarray(reference(x, *_mosaic.pieces(w)))
        for decode, spec in [(d, v) for d in args.decodes if d != "none" for v in args.variants]:
            try:
                with variant(spec):
                    got = np.asarray(jax.jit(mosaic(decode))(x, w), np.float32)
            # a setting this shape does not fit (e.g. _BLOCKS=8 at 768 columns, _TILE=3), whatever it raises
            except Exception as e:
                print(f"check {n}x{k} T={t} {decode} {spec}: refused ({type(e).__name__}: {e})", flush=True)
                refused["NF4"].add(spec)
                continue
            err = float(np.abs(got - want).max() / np.abs(want).max())
            print(f"check {n}x{k} T={t} {decode} {spec}: max rel err {err:.2e}", flush=True)
            assert err < 2e-2, err
    rows = []
    for fmt in args.formats:
        for n, k in fm.SHAPES:
            ws = fm.copies(fm.nf4_weight if fmt == "NF4" else fm.fp8_weight, n, k, rng)
            count = max(2, int(np.ceil(3 * fm.L2_BYTES / (n * k * 2))))
            dense = [jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)).astype(jnp.bfloat16)
                     for _ in range(count)]  # fmt: skip
            for t in args.tokens:
                x = jnp.asarray(rng.standard_normal((t, k), dtype=np.float32)).astype(jnp.bfloat16)
                r = {"format": fmt, "n": n, "k": k, "tokens": t}
                if fmt == "FP8":  # quantized_matmul takes the Mosaic kernel on Hopper: checked as it runs
                    want = (
                        np.asarray(x, np.float64)
                        @ np.asarray(ws[0].dequantize(dtype=jnp.float32), np.float64).T
                    )
                    got = np.asarray(jax.jit(fm.fused)(x, ws[0]), np.float64)
                    r["check_rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
                    assert r["check_rel_err"] < 2e-2, r
                r["dense_us"] = fm.time_per_matmul(fm.dense, dense, x) * 1e6
                r["triton_us"] = fm.time_per_matmul(triton, ws, x) * 1e6
                r["quantized_matmul_us"] = fm.time_per_matmul(fm.fused, ws, x) * 1e6
                if fmt == "NF4" and args.parts:
                    # (packed bytes [n, k / 2], float32 absmax [k / 64, n]): the difference from mosaic_products_us
                    # is what decoding the nested absmax on every call costs
                    decoded = [_mosaic.pieces(w) for w in ws]
                    r["mosaic_products_absmax_decoded_us"] = fm.time_per_matmul(
                        lambda x, qa: _mosaic.kernel(x, *qa, table=NF4), decoded, x) * 1e6  # fmt: skip
                for spec in [v for v in args.variants if v not in refused[fmt]]:
                    tag = f"[{spec}]" if spec else ""
                    decodes = [d for d in args.decodes if t <= 32 or d in ("prmt", "products")]
                    with variant(spec):  # read when the kernel is traced
                        for decode in decodes if fmt == "NF4" else ():
                            r[f"mosaic_{decode}{tag}_us"] = fm.time_per_matmul(mosaic(decode), ws, x) * 1e6
                        if fmt == "FP8":  # the kernel called directly, also where quantized_matmul does not
                            r[f"mosaic{tag}_us"] = fm.time_per_matmul(_mosaic.fp8_matmul, ws, x) * 1e6
                print(json.dumps({key: round(v, 4 if key == "check_rel_err" else 1) if isinstance(v, float) else v
                                  for key, v in r.items()}), flush=True)  # fmt: skip
                rows.append(r)
    if args.out:
        meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
        pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
