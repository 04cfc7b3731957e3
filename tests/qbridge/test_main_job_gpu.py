"""The main job on the GPU at real model size (`pytest -m gpu`): transformers-made quantized checkpoints
with Llama-3-8B layer shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 32000; one
decoder layer) loaded into the Flax Llama, then run again and again, with XLA's defaults.

Each format runs in a fresh Python process (``tests/main_job.py``), importing qbridge as the README does,
so that nothing this test process did (JAX flags, earlier tests) helps it. Every run is CALLS forwards
under ``nnx.jit`` and CALLS under ``jax.jit`` of the split state, then CALLS of the latter on 16 tokens (16
rows of x per weight: the kept layers' Mosaic GPU kernel on Hopper), dense and ``keep_quantized=True``,
parity against the torch quantized model printed (run with ``-s`` to see it).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytest.importorskip("flax")

SCRIPT = pathlib.Path(__file__).parents[1] / "main_job.py"
LLAMA_3_8B_LAYER = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
)  # fmt: skip


def _dense(path: pathlib.Path, **overrides) -> pathlib.Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**LLAMA_3_8B_LAYER, **overrides})
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("main_job")
    # FP8 gets an intermediate size that is not a multiple of 128: partial tiles in gate/up rows and down columns
    return root, {
        "8b": _dense(root / "bf16-8b"),
        "8b-partial": _dense(root / "bf16-8b-partial", intermediate_size=14400),
    }


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "fp8", "torchao"])
def test_main_job_at_real_size(dense_dirs, fmt):
    if fmt == "torchao":
        pytest.importorskip("torchao")
    root, dirs = dense_dirs
    out = root / f"{fmt}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE")}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")])
    dense = dirs["8b-partial" if fmt == "fp8" else "8b"]
    proc = subprocess.run([sys.executable, str(SCRIPT), fmt, str(dense), str(root / "work"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    expected = ["dense"] if fmt == "torchao" else ["dense", "keep_quantized"]
    assert sorted(result["runs"]) == sorted(expected)
    for kind, run in result["runs"].items():
        if kind == "keep_quantized":
            assert run["quantized_layers"] == 7  # the decoder layer's seven projections
        forms = [form for form, r in run.items() if isinstance(r, dict)]
        assert len(forms) == 3, forms  # nnx.jit, jax.jit of the split state, 16 tokens of it
        for form in forms:
            r = run[form]
            print(
                f"\n[{fmt} {kind} {form}] {r['calls_ok']} calls, median {r['median_ms_after_first']} ms\n{r['parity']}"
            )
            assert r["error"] is None and r["calls_ok"] >= 10, f"{fmt} {kind} {form}: {r['error']}"
            assert r["same_every_call"], f"{fmt} {kind} {form}: the logits changed between calls"
            assert r["parity_ok"], (
                f"{fmt} {kind} {form}: logits differ from the torch quantized model\n{r['parity']}"
            )
