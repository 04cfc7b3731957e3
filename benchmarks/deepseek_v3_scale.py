"""Loading at DeepSeek-V3 scale: a synthetic FP8 block checkpoint with DeepSeek-V3's tensor shapes and
counts for a few MoE layers, loaded to JAX with ``qbridge.load_checkpoint``.

Each MoE layer holds what a DeepSeek-V3 MoE layer holds (``config.json`` of deepseek-ai/DeepSeek-V3):
256 routed experts and one shared expert, each ``gate_proj``/``up_proj`` ``[2048, 7168]`` and ``down_proj``
``[7168, 2048]`` in float8_e4m3fn with 128x128 ``weight_scale_inv`` blocks; MLA attention (``q_a_proj``
``[1536, 7168]``, ``q_b_proj`` ``[24576, 1536]``, ``kv_a_proj_with_mqa`` ``[576, 7168]`` with its partial
tile row, ``kv_b_proj`` ``[32768, 512]``, ``o_proj`` ``[7168, 16384]``) in FP8; norms, the router
``gate.weight`` ``[experts, 7168]`` and ``e_score_correction_bias`` in bf16/float32. Values are random (never
zeros). One file per layer, with ``model.safetensors.index.json``, as the real checkpoint is sharded.

Printed and written (``--out``): tensors, bytes, the load's wall time in a warm page cache (first and
repeated load in this process), tensors per second, wall and host-CPU microseconds per tensor, the
physical floor measured in the same run (page-cache read with 8 threads, pinned host-to-device copies;
the floor overlaps them: ``bytes / min(read, copy)``), and the extrapolation to the whole model (61
layers, 58 of them MoE; about 91,000 tensors, 680 GB).

Usage (GPU machine): ``python benchmarks/deepseek_v3_scale.py --layers 2 --out results/deepseek-v3-scale-h200.json``.
``--shard`` splits the weights over every visible GPU (``sharding=``, tensor parallel), the load of a model
too large for one GPU (on a CPU: over the host devices ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
makes). ``--experts 8`` makes a small checkpoint for a quick run (on a CPU too: ``--device cpu``). ``--tiny`` keeps
every tensor and name at tiny shapes: the wall time per tensor is then the host work per tensor.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import platform
import shutil
import statistics
import tempfile
import time

import torch

HIDDEN, MOE_INTER, Q_LORA, KV_LORA, ROPE, HEADS = 7168, 2048, 1536, 512, 64, 128
WHOLE_MODEL = {"layers": 61, "moe_layers": 58, "tensors": 91_000, "bytes": 680e9}


def use_tiny_shapes() -> None:
    """Every tensor and name as before, at tiny shapes (``--tiny``: hidden 256, expert 128): the wall time per
    tensor of a load is then its host work."""
    global HIDDEN, MOE_INTER, Q_LORA, KV_LORA, ROPE, HEADS
    HIDDEN, MOE_INTER, Q_LORA, KV_LORA, ROPE, HEADS = 256, 128, 128, 64, 64, 2


def layer_tensors(i: int, experts: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, kind) of one DeepSeek-V3 MoE decoder layer; kind is "fp8", "bf16" or "f32"."""
    p = f"model.layers.{i}."
    t: dict[str, tuple[tuple[int, ...], str]] = {
        p + "input_layernorm.weight": ((HIDDEN,), "bf16"),
        p + "post_attention_layernorm.weight": ((HIDDEN,), "bf16"),
        p + "self_attn.q_a_proj.weight": ((Q_LORA, HIDDEN), "fp8"),
        p + "self_attn.q_a_layernorm.weight": ((Q_LORA,), "bf16"),
        p + "self_attn.q_b_proj.weight": ((HEADS * (128 + ROPE), Q_LORA), "fp8"),
        p + "self_attn.kv_a_proj_with_mqa.weight": ((KV_LORA + ROPE, HIDDEN), "fp8"),
        p + "self_attn.kv_a_layernorm.weight": ((KV_LORA,), "bf16"),
        p + "self_attn.kv_b_proj.weight": ((HEADS * (128 + 128), KV_LORA), "fp8"),
        p + "self_attn.o_proj.weight": ((HIDDEN, HEADS * 128), "fp8"),
        p + "mlp.gate.weight": ((experts, HIDDEN), "bf16"),
        p + "mlp.gate.e_score_correction_bias": ((experts,), "f32"),
    }
    mlps = [f"{p}mlp.experts.{e}." for e in range(experts)] + [f"{p}mlp.shared_experts."]
    for m in mlps:
        t[m + "gate_proj.weight"] = ((MOE_INTER, HIDDEN), "fp8")
        t[m + "up_proj.weight"] = ((MOE_INTER, HIDDEN), "fp8")
        t[m + "down_proj.weight"] = ((HIDDEN, MOE_INTER), "fp8")
    return t


def write_checkpoint(root: pathlib.Path, layers: int, experts: int, device: str) -> tuple[int, int]:
    """Writes the checkpoint into ``root`` (made if missing); returns (tensor count, bytes)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map, count, nbytes = {}, 0, 0
    for i in range(layers):
        state = {}
        for name, (shape, kind) in layer_tensors(i, experts).items():
            if kind == "fp8":
                w = (torch.randn(shape, generator=gen, device=device) * 64).to(torch.float8_e4m3fn)
                grid = (-(-shape[0] // 128), -(-shape[1] // 128))
                s = torch.rand(grid, generator=gen, device=device) * 1e-3 + 1e-5
                state[name] = w.cpu()
                state[name.replace(".weight", ".weight_scale_inv")] = s.cpu()
            else:
                dtype = torch.bfloat16 if kind == "bf16" else torch.float32
                state[name] = torch.randn(shape, generator=gen, device=device).to(dtype).cpu()
        file = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(state, root / file, metadata={"format": "pt"})
        for name, value in state.items():
            weight_map[name] = file
            count += 1
            nbytes += value.numel() * value.element_size()
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map})
    )
    config = {  # the sizes of the tensors above (a loader checks them against the model this config builds)
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": HIDDEN,
        "moe_intermediate_size": MOE_INTER,
        "q_lora_rank": Q_LORA,
        "kv_lora_rank": KV_LORA,
        "qk_rope_head_dim": ROPE,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "first_k_dense_replace": 0,  # every layer written is an MoE layer
        "num_hidden_layers": layers,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [128, 128],
            "activation_scheme": "dynamic",
        },
    }
    (root / "config.json").write_text(json.dumps(config))
    return count, nbytes


def read_bandwidth(files: list[pathlib.Path], threads: int, chunk: int = 64 << 20) -> float:
    """Bytes/s reading ``files`` from the page cache with ``threads`` threads, ``chunk`` bytes at a time
    (default 64 MiB; smaller for a small checkpoint, so that every thread has reads to do)."""

    def read(job: tuple[pathlib.Path, int]) -> int:
        path, offset = job
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            return len(f.read(chunk))

    jobs = [(f, o) for f in files for o in range(0, f.stat().st_size, chunk)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, jobs))
    return total / (time.perf_counter() - t0)


def pinned_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of pinned host-to-device copies (median of 5)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:])


def tensor_parallel(devices: list) -> tuple:
    """``sharding=`` splitting each projection over ``devices`` (one mesh axis ``"x"``): column-parallel
    ``gate_proj``/``up_proj``/``q_b_proj``/``kv_b_proj`` kernels (``[in, out]``, out split), row-parallel
    ``down_proj``/``o_proj`` kernels (in split); other leaves replicated."""
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(devices), ("x",))
    return mesh, [
        (r"(gate_proj|up_proj|q_b_proj|kv_b_proj)\.kernel$", P(None, "x")),
        (r"(down_proj|o_proj)\.kernel$", P("x", None)),
    ]


def _size(nbytes: int) -> str:
    """Bytes in words: GB above a gigabyte, MB below."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Load a synthetic FP8 checkpoint with DeepSeek-V3's MoE-layer tensors to JAX, against "
        "the page-cache read and pinned-copy floor measured in the same run."
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=2,
        help="MoE layers to write (default 2: about 23 GB, 11.5 GB a layer; tiny shapes: 26 MB a layer)",
    )
    parser.add_argument("--experts", type=int, default=256, help="routed experts per layer (default 256)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--dir", default=None, help="where to write the checkpoint (default: a temporary dir)"
    )
    parser.add_argument("--loads", type=int, default=2, help="loads in this process (default 2)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="load the checkpoint an earlier run with the same arguments left in --dir",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the same tensors and names at tiny shapes (hidden 256, expert 128): device work and reading "
        "become negligible, so the wall time per tensor is the host work per tensor",
    )
    parser.add_argument(
        "--shard",
        action="store_true",
        help="split every weight over all visible GPUs (or CPU devices with --device cpu; tensor parallel: experts' and attention's gate/up/q_b/kv_b "
        "kernels by columns, down/o kernels by rows, the rest replicated), as a model too large for one GPU loads",
    )
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()

    import jax

    import qbridge

    if args.tiny:
        use_tiny_shapes()
    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="deepseek-v3-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    index = root / "model.safetensors.index.json"
    if args.reuse and index.exists():  # as an earlier run with the same arguments wrote it
        written = json.loads(index.read_text())
        count, nbytes = len(written["weight_map"]), written["metadata"]["total_size"]
        print(f"reusing {count} tensors, {_size(nbytes)} in {root}")
    else:
        count, nbytes = write_checkpoint(root, args.layers, args.experts, args.device)
        print(f"wrote {count} tensors, {_size(nbytes)} in {time.perf_counter() - t0:.1f} s to {root}")
    files = sorted(root.glob("*.safetensors"))
    read_bandwidth(files, 8)  # into the page cache
    read8 = read_bandwidth(files, 8)
    read1 = read_bandwidth(files, 1)
    gpu = args.device == "cuda"
    copy = pinned_copy_bandwidth() if gpu else None  # a CPU load copies nothing to a device
    devices = jax.local_devices(backend="gpu" if gpu else "cpu")  # on a CPU: XLA_FLAGS's host devices
    gpus = len(devices) if gpu and args.shard else 1
    # split over GPUs, each copies its share over its own link (GPU 0's bandwidth taken for each)
    rate = min(read8, gpus * copy) if copy is not None else read8
    floor = nbytes / rate
    print(
        f"page-cache read: {read8 / 1e9:.1f} GB/s (8 threads), {read1 / 1e9:.1f} GB/s (1 thread); "
        + (f"pinned host-to-device: {copy / 1e9:.1f} GB/s; " if copy is not None else "")
        + f"floor {floor:.3f} s"
    )

    sharding = tensor_parallel(devices) if args.shard else None
    if sharding is not None:
        kind = "GPU" if gpu else "CPU device"
        print(f"split over {len(devices)} {kind}{'s' if len(devices) > 1 else ''}")
    loads = []
    for i in range(args.loads):
        wall0, cpu0, own0 = time.perf_counter(), time.process_time(), time.thread_time()
        params, report = qbridge.load_checkpoint(
            root, device=args.device, progress=False, sharding=sharding, return_report=True
        )
        jax.block_until_ready(params)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        own = time.thread_time() - own0  # the calling thread alone: checks, launches, handoff (no reading)
        leaves = len(jax.tree.leaves(params))
        del params
        loads.append(
            {
                "wall_s": wall,
                "host_cpu_s": cpu,
                "caller_thread_cpu_s": own,
                "leaves": leaves,
                "read_bytes": report.read_bytes,
            }
        )
        print(
            f"load {i + 1}: {wall:.2f} s wall"
            # at tiny shapes the floor is microseconds: the wall time is host work, not bandwidth
            + ("" if args.tiny else f" ({wall / floor:.1f}x the floor)")
            + f", {cpu:.2f} s host CPU "
            f"({own:.2f} s on the calling thread); {leaves} leaves; {report.read_bytes / nbytes:.3f}x the stored "
            f"bytes read; {count / wall:.0f} tensors/s; "
            f"{wall / count * 1e6:.0f} us wall, {cpu / count * 1e6:.0f} us host CPU and "
            f"{own / count * 1e6:.0f} us on the calling thread per tensor"
        )
    best = min(loads, key=lambda r: r["wall_s"])
    per_tensor = best["wall_s"] / count
    per_byte = best["wall_s"] / nbytes
    whole = {"by_tensors_s": per_tensor * WHOLE_MODEL["tensors"]}
    if not args.tiny:  # tiny shapes: the bytes are not DeepSeek-V3's
        whole.update(by_bytes_s=per_byte * WHOLE_MODEL["bytes"], floor_s=WHOLE_MODEL["bytes"] / rate)
    if args.tiny:  # the bytes are not DeepSeek-V3's: only the host work per tensor extrapolates
        print(
            f"host work for DeepSeek-V3's ~{WHOLE_MODEL['tensors']} tensors at this rate: {whole['by_tensors_s']:.1f} s"
        )
    else:
        print(
            f"whole DeepSeek-V3 (~{WHOLE_MODEL['tensors']} tensors, {WHOLE_MODEL['bytes'] / 1e9:.0f} GB) at this rate: "
            f"{whole['by_tensors_s']:.0f} s by tensor count, {whole['by_bytes_s']:.0f} s by bytes; "
            f"floor {whole['floor_s']:.0f} s"
            + (
                " (one GPU cannot hold it dense: a multi-GPU load)"
                if gpu
                else " (1.4 TB dense in host memory)"
            )
        )
    result = {
        "device": torch.cuda.get_device_name()
        if gpu
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "versions": {"torch": torch.__version__, "jax": jax.__version__},
        "layers": args.layers,
        "tiny": args.tiny,
        "experts": args.experts,
        "devices": len(devices) if args.shard else 1,
        "tensors": count,
        "bytes": nbytes,
        "read_gb_s_8_threads": read8 / 1e9,
        "read_gb_s_1_thread": read1 / 1e9,
        "pinned_h2d_gb_s": copy / 1e9 if copy is not None else None,
        "floor_s": floor,
        "loads": loads,
        "whole_model_extrapolation": whole,
    }
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
