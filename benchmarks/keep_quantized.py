"""Keeping NF4 weights quantized in JAX: parameter memory and forward latency against the dense path, on a
model with Llama-3-8B layer shapes.

Writes an NF4 checkpoint (bitsandbytes on the GPU, transformers' key layout) of N decoder layers (vocab
32000), loads it dense and kept quantized into jax_side's Llama, and times the forward as a user runs it
again and again: ``jax.jit`` over the model's split state (``nnx.jit`` would walk the module graph in Python
on every call), batch 1 at 1, 16 and 128 tokens, XLA's defaults. Every model stays loaded and the rounds
alternate between them (the forward's time moves between runs and machines more than between models run
side by side); each round times 10 calls each waited for (their median: a step that reads its result) and
10 calls queued back to back before one wait (a loop that keeps its results on the device); a figure is
the median over the rounds, printed with the rounds' range. Kept weights
run through the fused kernel (``matmul_path("auto")``) and, for comparison, expanded then multiplied
(``matmul_path("expand")``); an FP8 checkpoint (128x128 block scales) of the same shapes likewise.
Whether a dense weight is materialized is read off the compiled program's temporary memory; parameter
memory is what JAX's allocator holds after the load; the bytes-moved floor is the parameter bytes at
4.2 TB/s.

    python benchmarks/keep_quantized.py --layers 4 --out benchmarks/results/keep-quantized-fused-h200.json

Each model's lowering and compile times are printed as it is compiled. To look into one model's compile
(here with the Mosaic GPU kernel taking up to 128 rows of x), with every thread's stack printed if it takes
over 240 s::

    python benchmarks/keep_quantized.py --layers 1 --only "kept NF4" --max-rows 128 --rounds 1 --dump-after 240

To compare the kernel's row limit within one process (the models alternate in every round)::

    python benchmarks/keep_quantized.py --layers 4 --only dense "kept NF4" "kept FP8" "kept NF4, up to 32 rows" \
        "kept FP8, up to 32 rows" --also-rows 32 --rounds 5
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from convert_8b import SHAPES, nf4_layers
from safetensors.torch import save_file

import jax_side
import qbridge
from jax_side import _fused, _mosaic

VOCAB = 32000
CONFIG = dict(vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)  # fmt: skip


def fp8_layers(layers: int) -> dict[str, torch.Tensor]:
    """Random Llama-3-8B linear weights as float8_e4m3fn with 128x128 block scales (DeepSeek-V3's layout)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    state = {}
    for i in range(layers):
        for name, (rows, cols) in SHAPES.items():
            w = torch.randn(rows, cols, device="cuda", generator=gen) * 0.02
            tiles = w.reshape(rows // 128, 128, cols // 128, 128)
            scale = tiles.abs().amax(dim=(1, 3)) / 448.0
            q = (tiles / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
            state[f"model.layers.{i}.{name}.weight"] = q.cpu()
            state[f"model.layers.{i}.{name}.weight_scale_inv"] = scale.float().cpu()
    return state


def write(path: pathlib.Path, layers: int, fmt: str = "nf4") -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    state = nf4_layers(layers) if fmt == "nf4" else fp8_layers(layers)
    state["model.embed_tokens.weight"] = (
        (torch.randn(VOCAB, 4096, device="cuda", generator=gen) * 0.02).bfloat16().cpu()
    )
    state["lm_head.weight"] = (torch.randn(VOCAB, 4096, device="cuda", generator=gen) * 0.02).bfloat16().cpu()
    state["model.norm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
    for i in range(layers):
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    quant = (
        {"quant_method": "bitsandbytes"}
        if fmt == "nf4"
        else {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    )
    config = dict(CONFIG, num_hidden_layers=layers, quantization_config=quant)
    (path / "config.json").write_text(json.dumps(config))


def write_checkpoint(root: pathlib.Path, layers: int, fmt: str) -> tuple[pathlib.Path, object, object]:
    """Writes ``fmt``'s checkpoint (``write``) into ``root / fmt``: its path, its ``LlamaConfig`` and the
    abstract target to load it into."""
    path = root / fmt
    path.mkdir()
    write(path, layers, fmt)
    config = jax_side.LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    return path, config, jax_side.abstract_llama(config, param_dtype=jnp.bfloat16)


def load_model(path: pathlib.Path, config, target, kept: bool) -> tuple[tuple, int, int]:
    """The Llama of ``path`` loaded onto the GPU, dense or kept quantized: ``((graphdef, state), bytes the
    parameters hold, bytes JAX's allocator gained in the load)``."""
    from flax import nnx

    before = _jax_bytes()
    params = qbridge.load_checkpoint(path, target=target, keep_quantized=kept, progress=False, device="cuda")
    jax.block_until_ready(params)
    resident = _jax_bytes() - before  # the loaded parameters live in JAX's allocator
    model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
    if kept:
        jax_side.load_quantized_into_nnx(model, params)
    else:
        nnx.update(model, params)
    held, _ = jax_side.quantized_nbytes(params)
    return nnx.split(model), int(held), int(resident)


def check_also_rows(parser: argparse.ArgumentParser, also_rows: int | None) -> None:
    """Refuses (``parser.error``) a second row limit the Mosaic GPU kernel cannot take (2 to its own 128) or
    that is the limit in use (``jax_side._mosaic.MAX_ROWS``), which would time the same programs twice."""
    most = max(_mosaic._STAGES)
    if also_rows is not None and not 2 <= also_rows <= most:
        parser.error(f"--also-rows must be 2 to {most} (the rows the kernel takes), got {also_rows}")
    if also_rows == _mosaic.MAX_ROWS:
        parser.error(f"--also-rows {also_rows} is the row limit in use already")


def _forward(graphdef, state, ids):
    from flax import nnx

    return nnx.merge(graphdef, state)(ids)


def latency_ms(forward, state, ids, calls: int = 10) -> tuple[float, float]:
    """Milliseconds per forward, median over ``calls``: (each call waited for, as a step that reads its
    result does; back to back, ``calls`` calls queued before one wait, as a loop that keeps its results on
    the device does)."""
    forward(state, ids).block_until_ready()
    waited = []
    for _ in range(calls):
        start = time.perf_counter()
        forward(state, ids).block_until_ready()
        waited.append(time.perf_counter() - start)
    start = time.perf_counter()
    outs = [forward(state, ids) for _ in range(calls)]
    jax.block_until_ready(outs)
    return statistics.median(waited) * 1e3, (time.perf_counter() - start) / calls * 1e3


TOKENS = (1, 16, 128)


def _ids(tokens: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(tokens).integers(0, VOCAB, (1, tokens)), jnp.int32)


def _jax_bytes() -> int:
    return jax.local_devices(backend="gpu")[0].memory_stats()["bytes_in_use"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="rounds over every model and token count")
    parser.add_argument("--out", default=None)
    parser.add_argument("--fp8-earlier-tiles", action="store_true",
                        help="also time kept FP8 compiled with the kernel's tiles before 2026-12-01 (a scale gathered "
                             "per element up to 16 rows, 128x64 output tiles above 64)")  # fmt: skip
    parser.add_argument("--triton", action="store_true",
                        help="also time kept NF4 and FP8 compiled with the Pallas Triton kernel where Hopper GPUs take "
                             "the Mosaic GPU kernel (2 to 128 tokens; jax_side._mosaic)")  # fmt: skip
    parser.add_argument("--max-rows", type=int, default=None,
                        help="the most rows of x kept layers hand the Mosaic GPU kernel (jax_side._mosaic.MAX_ROWS)")  # fmt: skip
    parser.add_argument("--also-rows", type=int, default=None,
                        help="also time kept NF4 and FP8 compiled with this many rows as the Mosaic GPU kernel's limit "
                             "(jax_side._mosaic.MAX_ROWS), in the same rounds as the models at the limit in use")  # fmt: skip
    parser.add_argument("--only", nargs="+", default=None, help="time these models only (e.g. 'kept NF4')")
    parser.add_argument("--dump-after", type=float, default=None,
                        help="print every thread's stack after this many seconds (a compile that seems to hang)")  # fmt: skip
    parser.add_argument("--nf4-lookup", action="store_true",
                        help="also time kept NF4 with the Mosaic GPU kernel's byte-permute lookup of the table in "
                             "place of its product tables (jax_side._mosaic)")  # fmt: skip
    args = parser.parse_args()
    results: dict[str, dict] = {}
    largest_dense = max(np.prod(s) for s in SHAPES.values()) * 2
    modes = [("nf4", "dense", None), ("nf4", "kept NF4", "auto"), ("nf4", "kept NF4, expanded", "expand"),
             ("fp8", "kept FP8", "auto"), ("fp8", "kept FP8, expanded", "expand")]  # fmt: skip
    if args.fp8_earlier_tiles:
        modes.append(("fp8", "kept FP8, earlier tiles", "auto"))
    if args.triton:
        modes += [("nf4", "kept NF4, Triton kernel", "auto"), ("fp8", "kept FP8, Triton kernel", "auto")]
    if args.nf4_lookup:
        modes.append(("nf4", "kept NF4, table lookup", "auto"))
    also = f", up to {args.also_rows} rows" if args.also_rows is not None else None
    if also:
        modes += [("nf4", f"kept NF4{also}", "auto"), ("fp8", f"kept FP8{also}", "auto")]
    if args.only:
        unknown = set(args.only) - {m[1] for m in modes}
        if unknown:  # a misspelt name would time nothing
            parser.error(f"--only: no model {sorted(unknown)}; the models: {[m[1] for m in modes]}")
        modes = [m for m in modes if m[1] in args.only]
    if args.max_rows is not None:
        _mosaic.MAX_ROWS = args.max_rows
    check_also_rows(parser, args.also_rows)
    # the module's settings, set per model while it is compiled and restored after it
    max_rows, products, force = _mosaic.MAX_ROWS, _mosaic._products, _mosaic._force
    if args.dump_after:
        faulthandler.dump_traceback_later(args.dump_after, repeat=True)
    forwards = {}  # every model stays loaded, so that the rounds below alternate between them
    tmp = tempfile.TemporaryDirectory(dir=".")
    for fmt in ("nf4", "fp8"):
        path, config, target = write_checkpoint(pathlib.Path(tmp.name), args.layers, fmt)
        loaded: dict[bool, tuple] = {}  # kept weights are loaded once for both of their paths
        for mode_fmt, mode, matmul in modes:
            if mode_fmt != fmt:
                continue
            kept = mode != "dense"
            if kept not in loaded:
                loaded[kept] = load_model(path, config, target, kept)
            (graphdef, state), held, resident = loaded[kept]
            row: dict = {"param_bytes": held, "resident_jax_bytes": resident}
            # compiled here; the rounds below replay the compiled programs
            _fused._fp8_two_scales = _fused._fp8_wide_tiles = mode != "kept FP8, earlier tiles"
            _mosaic._force = False if mode.endswith("Triton kernel") else force
            _mosaic._products = False if mode == "kept NF4, table lookup" else products
            _mosaic.MAX_ROWS = args.also_rows if also and mode.endswith(also) else max_rows
            row["mosaic_max_rows"] = _mosaic.MAX_ROWS
            with jax_side.matmul_path(matmul or "auto"):
                forward = jax.jit(functools.partial(_forward, graphdef))
                for tokens in TOKENS:
                    ids = _ids(tokens)
                    start = time.perf_counter()
                    lowered = forward.lower(state, ids)
                    lowered_at = time.perf_counter()
                    compiled = lowered.compile()
                    row[f"tokens{tokens}_lower_s"] = lowered_at - start
                    row[f"tokens{tokens}_compile_s"] = time.perf_counter() - lowered_at
                    row[f"tokens{tokens}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
                    forward(state, ids).block_until_ready()
                    print(f"{mode} at {tokens} tokens: lowered in {row[f'tokens{tokens}_lower_s']:.1f} s, compiled in "
                          f"{row[f'tokens{tokens}_compile_s']:.1f} s", flush=True)  # fmt: skip
            _fused._fp8_two_scales = _fused._fp8_wide_tiles = True
            _mosaic._force, _mosaic._products, _mosaic.MAX_ROWS = force, products, max_rows
            forwards[mode] = (forward, state, matmul or "auto")
            results[mode] = row
    for r in range(args.rounds):
        for mode, (forward, state, matmul) in forwards.items():
            with jax_side.matmul_path(matmul):
                for tokens in TOKENS:
                    waited, queued = latency_ms(forward, state, _ids(tokens))
                    results[mode].setdefault(f"tokens{tokens}_waited_ms_rounds", []).append(waited)
                    results[mode].setdefault(f"tokens{tokens}_back_to_back_ms_rounds", []).append(queued)
        print(f"round {r + 1} of {args.rounds} done", flush=True)
    tmp.cleanup()
    for row in results.values():
        for tokens in TOKENS:
            for form in ("waited", "back_to_back"):
                row[f"tokens{tokens}_{form}_ms"] = statistics.median(row[f"tokens{tokens}_{form}_ms_rounds"])
    dense = results.get("dense")  # absent under --only

    def vs_dense(row: dict, key: str) -> str:
        return f"{row[key] / dense[key]:.2f}x dense; " if dense else ""

    print(
        f"{torch.cuda.get_device_name()}: {args.layers} Llama-3-8B layers (vocab {VOCAB}), jax.jit of the split "
        f"state, batch 1; median of {args.rounds} rounds (each: the median of 10 calls each waited for, then "
        "10 calls back to back); the models alternate within each round"
    )
    floor = {}
    for mode, row in results.items():
        for form in ("waited", "back_to_back"):
            print(f"  {mode:<19} {form:<12} params {row['param_bytes'] / 1e9:6.3f} GB  "
                  + "  ".join(f"{t} tokens {row[f'tokens{t}_{form}_ms']:7.3f} ms ({vs_dense(row, f'tokens{t}_{form}_ms')}"
                              f"rounds {min(row[f'tokens{t}_{form}_ms_rounds']):.3f}-{max(row[f'tokens{t}_{form}_ms_rounds']):.3f})" for t in TOKENS)
                  + f"  XLA temp {row['tokens1_temp_bytes'] / 1e6:.1f} MB"
                  + f"  bytes-moved floor {row['param_bytes'] / 4.2e12 * 1e3:.3f} ms at 4.2 TB/s")  # fmt: skip
        floor[mode] = row["param_bytes"] / 4.2e12
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "layers": args.layers,
            "vocab": VOCAB, "jax": jax.__version__, "torch": torch.__version__, "form": "jax.jit of nnx.split state",
            "rounds": args.rounds, "largest_dense_weight_bytes": int(largest_dense), "bytes_floor_s_at_4.2TBps": floor,
            "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
