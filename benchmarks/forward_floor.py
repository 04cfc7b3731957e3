"""How fast a kept-quantized Llama forward could be: its GPU time with every kept matmul at the copy ceiling.

Reads a ``profile_forward.py`` JSON (one process's kernel times per forward, dense and kept models side by
side) and, for each kept model traced with the Mosaic GPU kernels, replaces those kernels' time by the time
their weights' bytes take at the copy ceiling, keeping every other kernel of that forward (attention, norms,
the bfloat16 output layer, the activations' layout) as measured. The result is a floor for the forward's
GPU time with these kernels' work left as it is (decoding in registers cannot read fewer bytes than the
weights hold); its ratio to the dense forward's GPU time in the same run bounds what any kernel could reach.
Rows whose kept layers ran without the Mosaic kernels (one token: XLA's one-row reduction) are left out.

The weights' bytes are those of Llama-3-8B's seven projections per layer (q 4096x4096, k and v 1024x4096,
o 4096x4096, gate and up 14336x4096, down 4096x14336) in the formats ``keep_quantized.py`` writes: NF4
with a nested absmax (blocksize 64: 4 bits, an 8-bit absmax code per 64 elements and a float32 per 256
codes) and float8_e4m3fn with float32 128x128 block scales::

    python benchmarks/forward_floor.py benchmarks/results/profile-forward-grouped-2-h200.json --ceiling 4.27e12
"""

from __future__ import annotations

import argparse
import json

PROJECTIONS = (
    (4096, 4096),
    (1024, 4096),
    (1024, 4096),
    (4096, 4096),
    (14336, 4096),
    (14336, 4096),
    (4096, 14336),
)
FORMATS = ("NF4", "FP8")


def weight_bytes(fmt: str, n: int, k: int) -> int:
    """The bytes an ``[n, k]`` weight holds in ``fmt`` (NF4: packed nibbles, uint8 absmax codes, float32 nested
    absmax and offset; FP8: one byte per element and a float32 scale per 128x128 block)."""
    if fmt == "NF4":
        blocks = -(-n * k // 64)
        return n * k // 2 + blocks + 4 * -(-blocks // 256) + 4
    return n * k + 4 * -(-n // 128) * -(-k // 128)


def layer_bytes(fmt: str) -> int:
    """The bytes one decoder layer's seven projections hold in ``fmt``."""
    return sum(weight_bytes(fmt, n, k) for n, k in PROJECTIONS)


def floors(profile: dict, ceiling: float) -> list[dict]:
    """Per kept model traced with Mosaic kernels: measured and floor GPU time per forward (us) and both over
    the dense forward's GPU time at the same token count."""
    layers = profile["args"]["layers"]
    results = profile["results"]
    rows = []
    for name, r in results.items():
        if not name.startswith("kept "):
            continue
        fmt = name.split()[1].rstrip(",")
        tokens = name.rsplit(", ", 1)[1]
        dense = results.get(f"dense, {tokens}")
        mosaic = sum(k["us"] for k in r["by_name"] if "mosaic" in k["name"])
        if dense is None or fmt not in FORMATS or not mosaic:
            continue
        at_ceiling = layers * layer_bytes(fmt) / ceiling * 1e6
        floor = r["busy_us"] - mosaic + at_ceiling
        rows.append({
            "model": name, "busy_us": r["busy_us"], "dense_busy_us": dense["busy_us"], "mosaic_us": mosaic,
            "weights_at_ceiling_us": at_ceiling, "floor_us": floor,
            "busy_over_dense": r["busy_us"] / dense["busy_us"], "floor_over_dense": floor / dense["busy_us"],
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="a profile_forward.py JSON")
    parser.add_argument(
        "--ceiling", type=float, default=4.27e12, help="copy ceiling, bytes/s (default 4.27e12)"
    )
    args = parser.parse_args()
    profile = json.load(open(args.profile))
    print(f"{profile['device']}, jax {profile['jax']}: {profile['args']['layers']} layers; ceiling "
          f"{args.ceiling / 1e12:.2f} TB/s; GPU time per forward")  # fmt: skip
    for row in floors(profile, args.ceiling):
        print(f"  {row['model']:<36} busy {row['busy_us']:7.1f} us ({row['busy_over_dense']:.2f}x dense "
              f"{row['dense_busy_us']:.1f}); Mosaic kernels {row['mosaic_us']:6.1f} us -> weights at the ceiling "
              f"{row['weights_at_ceiling_us']:6.1f} us: floor {row['floor_us']:6.1f} us "
              f"({row['floor_over_dense']:.2f}x dense)")  # fmt: skip


if __name__ == "__main__":
    main()
