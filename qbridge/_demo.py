"""``qbridge demo``: a small Llama quantized to NF4 by transformers + bitsandbytes, saved as a real checkpoint,
loaded into a Flax model through qbridge, and compared with the torch model. Nothing is downloaded."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

DEMO_CONFIG: dict[str, Any] = dict(
    vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip


@dataclasses.dataclass
class DemoResult:
    """What the demo did: timings in seconds, the parity report, the weight check."""

    checkpoint: str
    summary: str
    parity: Any
    weights_checked: int
    weights_equal: int
    seconds: dict[str, float]
    device: str
    kept_in: str | None = None  # the workdir holding the checkpoints (None: a temporary directory, removed)


def _timed(seconds: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    seconds[name] = time.perf_counter() - start
    return out


def _bnb_weights_equal(model: torch.nn.Module, params: Any) -> tuple[int, int]:
    """How many 4-bit weights qbridge loaded with exactly bitsandbytes' own values (as numbers)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    checked = equal = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight: Any = module.weight  # a bitsandbytes Params4bit
        theirs = F.dequantize_4bit(weight.data, weight.quant_state).float().cpu()
        node = params
        for part in name.split("."):
            node = node[int(part) if part.isdigit() else part]
        ours = torch.from_numpy(np.asarray(node["kernel"], dtype=np.float32)).t()
        checked += 1
        equal += bool(torch.equal(ours, theirs))
    return checked, equal


# written by the demo beside each checkpoint it saves: the mark that a folder is the demo's to replace (a
# config of the demo's model alone is not: a user's own quantization of it has one too)
MARK = "qbridge-demo.json"


def _made_by_demo(folder: pathlib.Path) -> bool:
    """Whether ``folder`` holds a checkpoint an earlier demo wrote (its mark, and the demo's model's config)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        mark = json.loads((folder / MARK).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(mark, dict)
        and mark.get("written_by") == "qbridge demo"
        and isinstance(config, dict)
        and all(config.get(k) == v for k, v in DEMO_CONFIG.items())
    )


def _mark(folder: pathlib.Path) -> None:
    (folder / MARK).write_text(json.dumps({"written_by": "qbridge demo"}) + "\n")


# what save_pretrained writes for the demo's models, and the demo's mark: the only files the demo removes
_SAVED = re.compile(
    r"(generation_)?config\.json|model(-[0-9]+-of-[0-9]+)?\.safetensors|model\.safetensors\.index\.json|"
    + re.escape(MARK)
)


def _clear(folders: list[pathlib.Path], overwrite: bool) -> None:
    """Readies the demo's checkpoint folders for writing, or raises FileExistsError before anything is
    removed. A folder may hold only files ``save_pretrained`` writes (``config.json``,
    ``generation_config.json``, ``model*.safetensors`` and its index) and the demo's mark; they are removed
    where an earlier demo wrote them (its mark beside the demo's model's config), and for another checkpoint
    with ``overwrite``.
    Anything else (another file, a folder, a link) is never removed: the demo refuses."""
    removals: list[pathlib.Path] = []
    for folder in folders:
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise FileExistsError(
                f"{folder} exists and is no folder (a file or a link); pick another workdir"
            )
        if not folder.exists():
            continue
        entries = sorted(folder.iterdir())
        other = [e.name for e in entries if e.is_symlink() or not e.is_file() or not _SAVED.fullmatch(e.name)]
        if other:
            raise FileExistsError(
                f"{folder} holds {', '.join(other[:5])}{' ...' if len(other) > 5 else ''}, which are not files of "
                "a checkpoint the demo writes; it removes no others: move them, or pick another workdir"
            )
        if entries and not _made_by_demo(folder) and not overwrite:
            raise FileExistsError(
                f"{folder} holds a checkpoint an earlier demo did not write; pass overwrite=True (on the "
                "command line: --overwrite) to replace it, or pick another workdir"
            )
        removals += entries
    for entry in removals:  # no stale shards of the checkpoint that was there
        entry.unlink()


def run_demo(
    *,
    seed: int = 0,
    workdir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> DemoResult:
    """Runs the demo; ``workdir`` keeps the checkpoints, ``workdir/llama-bf16`` and ``workdir/llama-nf4`` (a
    temporary directory otherwise); ``device``: the torch device bitsandbytes quantizes on (``"cpu"``,
    ``"cuda"``, ``"cuda:i"``; default: the GPU if present). Checkpoints an earlier demo left there are
    replaced; other checkpoints only with ``overwrite``; other files never.

    Raises:
        ValueError: ``device`` is not a device torch sees here.
        FileExistsError: ``workdir`` holds ``llama-bf16`` or ``llama-nf4`` with a checkpoint an earlier demo did
            not write (without ``overwrite``), or with files no checkpoint has, or as a file or link.
    """
    if device is not None:
        from qbridge._devices import resolve_device

        device = str(resolve_device(device)[1])  # a device that is not one, or not here, fails now
    if workdir is not None:
        if pathlib.Path(workdir).exists() and not pathlib.Path(workdir).is_dir():
            raise FileExistsError(f"{workdir} is a file; --workdir names a folder to keep the checkpoints in")
        _clear([pathlib.Path(workdir) / "llama-bf16", pathlib.Path(workdir) / "llama-nf4"], overwrite)
    import jax
    import jax.numpy as jnp
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    import jax_side
    from qbridge import inspect_checkpoint, load_checkpoint
    from qbridge.parity import compare

    transformers.logging.disable_progress_bar()
    tdev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(workdir or tmp)
        dense_dir, nf4_dir = root / "llama-bf16", root / "llama-nf4"
        torch.manual_seed(seed)
        dense: Any = LlamaForCausalLM(LlamaConfig(**DEMO_CONFIG))
        dense = dense.to(torch.bfloat16)
        dense.save_pretrained(dense_dir)
        _mark(dense_dir)
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        model = _timed(seconds, "quantize (bitsandbytes)", lambda: AutoModelForCausalLM.from_pretrained(
            dense_dir, quantization_config=quant, dtype=torch.bfloat16, device_map=tdev))  # fmt: skip
        _timed(seconds, "save_pretrained", lambda: model.save_pretrained(nf4_dir))
        _mark(nf4_dir)
        summary = str(inspect_checkpoint(nf4_dir))
        config = jax_side.LlamaConfig.from_hf(json.loads((nf4_dir / "config.json").read_text()))
        target = jax_side.abstract_llama(config, param_dtype=jnp.bfloat16)
        params, report = _timed(seconds, "load into Flax (qbridge)", lambda: load_checkpoint(
            nf4_dir, target=target, progress=False, return_report=True))  # fmt: skip
        flax_model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
        from flax import nnx

        nnx.update(flax_model, params)
        checked, equal = _bnb_weights_equal(model, params)
        ids = np.random.default_rng(seed).integers(0, config.vocab_size, (2, 16))
        with torch.no_grad():
            ref = _timed(seconds, "torch forward", lambda: model(torch.from_numpy(ids).to(tdev)).logits.cpu())
        # jax.jit over the split state, not nnx.jit: nnx.jit walks the module graph in Python on every call
        # and copies the whole state out; split once, and each call is the compiled program alone
        graphdef, state = nnx.split(flax_model)
        forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        x = jnp.asarray(ids)
        forward(state, x).block_until_ready()  # compile
        out = _timed(seconds, "flax forward (jitted)", lambda: forward(state, x).block_until_ready())
        parity = compare({"logits": ref}, {"logits": out})  # bf16 on both sides: bf16 tolerances
        kept_in = None if workdir is None else os.fspath(workdir)
        return DemoResult(str(nf4_dir), summary, parity, checked, equal, seconds, report.device, kept_in)


def format_demo(result: DemoResult) -> str:
    lines = [
        "qbridge demo: a Llama (4 layers, hidden 128) quantized to NF4 by transformers + bitsandbytes,",
        "saved with save_pretrained, loaded into a Flax nnx model through qbridge.",
        "",
        result.summary,
        "",
        f"4-bit weights equal to bitsandbytes' own dequantization: {result.weights_equal} of {result.weights_checked}",
        "",
        "logits, torch (bitsandbytes) vs Flax (qbridge), both bf16:",
        str(result.parity),
        "",
        f"timings on {result.device}:",
    ]
    lines += [f"  {name:<28}{secs * 1e3:>10.1f} ms" for name, secs in result.seconds.items()]
    if result.kept_in is not None:
        where = pathlib.Path(result.kept_in)
        lines += [
            "",
            f"checkpoints kept: {where / 'llama-nf4'} (NF4), {where / 'llama-bf16'} (its bf16 weights)",
        ]
    else:  # the summary names the checkpoint's path, which is gone now
        lines += ["", "the checkpoints were in a temporary folder, removed: --workdir DIR keeps them"]
    return "\n".join(lines)
