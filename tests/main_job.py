"""The main job at real size, as a user runs it, in a fresh process: a transformers-made quantized Llama
checkpoint loaded into jax_side's Flax Llama and run again and again under ``nnx.jit`` and under
``jax.jit`` of the split state, dense and kept quantized, logits compared with the torch quantized model.

    python tests/main_job.py FORMAT DENSE_DIR WORK_DIR OUT_JSON

FORMAT: ``nf4`` (nested), ``fp4``, ``fp8`` (block 128, the dense model's partial tiles), ``torchao``
(int8 weight-only). DENSE_DIR: a transformers bf16 Llama checkpoint. Imports follow the README, XLA
runs with its defaults. Used by ``tests/qbridge/test_main_job_gpu.py`` (on CUDA; elsewhere the CPU).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import jax_side
import qbridge
from qbridge.parity import compare

CALLS = 12
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU for a quick look at small sizes


def fp8_block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's block quantization, on the GPU: ``scale_inv = amax / 448`` per block (partial tiles
    at the edges), ``W8 = e4m3(W / scale_inv)``."""
    rows, cols = w.shape
    gr, gc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(gr * block, gc * block, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.float()
    tiles = padded.view(gr, block, gc, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (tiles / scale[:, None, :, None]).view(gr * block, gc * block)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale


def fp8_dequantize_reference(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The float32 reference decode (``float32(W8) * scale_inv``, one rounding to bf16), written here."""
    rows, cols = q.shape
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (q.float() * expanded).to(torch.bfloat16)


def make_checkpoint(fmt: str, dense_dir: pathlib.Path, out: pathlib.Path, ids: torch.Tensor) -> np.ndarray:
    """Writes the ``fmt`` checkpoint with its real producer and returns the torch quantized model's logits."""
    import transformers

    transformers.logging.disable_progress_bar()
    if fmt in ("nf4", "fp4"):
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=fmt, bnb_4bit_use_double_quant=fmt == "nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_pretrained(
            dense_dir, quantization_config=config, dtype=torch.bfloat16, device_map=DEVICE
        )
        model.save_pretrained(out)
    elif fmt == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = transformers.LlamaForCausalLM.from_pretrained(
            dense_dir, dtype=torch.bfloat16, device_map=DEVICE
        )
        quantize_(
            model,
            Int8WeightOnlyConfig(),
            filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn,
        )
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "model.pt")
        (out / "config.json").write_text((dense_dir / "config.json").read_text())
    elif fmt == "fp8":
        from safetensors.torch import load_file, save_file

        state = load_file(dense_dir / "model.safetensors", device=DEVICE)
        flat, decoded = {}, {}
        for key, value in state.items():
            if ".layers." in key and key.endswith("_proj.weight"):
                q, scale = fp8_block_quantize(value)
                flat[key], flat[key.replace(".weight", ".weight_scale_inv")] = q, scale
                decoded[key] = fp8_dequantize_reference(q, scale)
            else:
                flat[key] = decoded[key] = value
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous().cpu() for k, v in flat.items()},
            out / "model.safetensors",
            metadata={"format": "pt"},
        )
        cfg = json.loads((dense_dir / "config.json").read_text())
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
            "activation_scheme": "dynamic",
        }
        (out / "config.json").write_text(json.dumps(cfg))
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(dense_dir)).to(
            DEVICE, torch.bfloat16
        )
        model.load_state_dict(decoded)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    with torch.no_grad():
        logits = model.eval()(ids.to(DEVICE)).logits.float().cpu().numpy()
    del model
    torch.cuda.empty_cache()
    return logits


def run_model(model, x: jax.Array, ref: np.ndarray) -> dict:
    """CALLS forwards under nnx.jit, then CALLS under jax.jit of the split state; parity of each with torch.
    Then CALLS of the split state's forward on the first 16 tokens of the first sequence (what decoding a
    short prompt multiplies: 16 rows of x per weight), against the same positions of torch's logits."""
    result = {}
    forward = nnx.jit(lambda m, ids: m(ids))
    graphdef, state = nnx.split(model)
    split_forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    short = x[:1, :16]
    for name, call, want in (
        ("nnx.jit", lambda: forward(model, x), ref),
        ("jax.jit split state", lambda: split_forward(state, x), ref),
        ("jax.jit split state, 16 tokens", lambda: split_forward(state, short), ref[:1, :16]),
    ):
        outs, times, error = [], [], None
        try:
            for _ in range(CALLS):
                t0 = time.perf_counter()
                logits = call().block_until_ready()
                times.append(time.perf_counter() - t0)
                outs.append(np.asarray(logits, dtype=np.float32))
        except Exception as e:
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        parity = compare({"logits": want}, {"logits": outs[-1].astype(jnp.bfloat16)}) if outs else None
        result[name] = {
            "calls_ok": len(outs),
            "error": error,
            "same_every_call": all(np.array_equal(o, outs[0]) for o in outs),
            "median_ms_after_first": statistics.median(times[1:]) * 1e3 if len(times) > 1 else None,
            "parity_ok": bool(parity and parity.ok),
            "parity": str(parity) if parity else None,
            "max_rel": parity.outputs[0].max_rel if parity else None,
            "cosine": parity.outputs[0].cosine if parity else None,
        }
    return result


def main(fmt: str, dense_dir: str, work: str, out_json: str) -> None:
    dense_dir, work = pathlib.Path(dense_dir), pathlib.Path(work)
    config = jax_side.LlamaConfig.from_hf(json.loads((dense_dir / "config.json").read_text()))
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, config.vocab_size, (2, 64)))
    ckpt = work / fmt
    ref = make_checkpoint(fmt, dense_dir, ckpt, ids)
    x = jnp.asarray(ids.numpy())
    results = {"format": fmt, "device": str(jax.devices()[0].device_kind), "runs": {}}
    for keep in (False, True) if fmt != "torchao" else (False,):
        target = jax_side.abstract_llama(config, param_dtype=jnp.bfloat16)
        t0 = time.perf_counter()
        params, report = qbridge.load_checkpoint(
            ckpt, target=target, keep_quantized=keep, progress=False, return_report=True
        )
        jax.block_until_ready(params)
        load_s = time.perf_counter() - t0
        model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
        if keep:
            swapped = jax_side.load_quantized_into_nnx(model, params)
        else:
            nnx.update(model, params)
            swapped = []
        del params
        run = run_model(model, x, ref)
        run.update(load_s=load_s, report=str(report), quantized_layers=len(swapped))
        results["runs"]["keep_quantized" if keep else "dense"] = run
        del model
    pathlib.Path(out_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
