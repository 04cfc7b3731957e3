"""The built-in example: quantize a random weight with the real producers, dequantize it with qbridge,
and report how close each result is to the producer's own dequantization and to the original weight."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

import torch_side


@dataclasses.dataclass
class DemoRow:
    """One line of the demo report."""

    fmt: str
    producer: str
    equal: bool
    max_abs_vs_producer: float
    rel_err_vs_original: float
    ms: float


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    fn()  # warm-up: first calls load kernels and tables
    t0 = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out, (time.perf_counter() - t0) * 1e3


def _row(fmt: str, producer: str, ours: torch.Tensor, theirs: torch.Tensor, original: torch.Tensor, ms: float) -> DemoRow:
    ours_f, theirs_f, orig_f = ours.float().cpu(), theirs.float().cpu(), original.float().cpu()
    same = ours.shape == theirs.shape and torch.equal(ours.cpu(), theirs.cpu())  # as numbers (-0.0 == 0.0)
    return DemoRow(
        fmt=fmt,
        producer=producer,
        equal=same,
        max_abs_vs_producer=float((ours_f - theirs_f).abs().max()),
        rel_err_vs_original=float((ours_f - orig_f).norm() / orig_f.norm()),
        ms=ms,
    )


def _bnb_rows(w: torch.Tensor) -> list[DemoRow]:
    import bitsandbytes.functional as F

    rows = []
    for quant_type, nested in (("nf4", True), ("fp4", False)):
        packed, qs = F.quantize_4bit(w, quant_type=quant_type, compress_statistics=nested)
        ours, ms = _timed(lambda: torch_side.dequantize(packed, qs))
        # (bitsandbytes' own CPU kernel is exact for rows of whole blocks, as in the default shape)
        theirs = F.dequantize_4bit(packed, qs)
        label = f"{quant_type.upper()}{' nested' if nested else ''}"
        rows.append(_row(label, "bitsandbytes", ours, theirs, w, ms))
    return rows


def _torchao_rows(w: torch.Tensor) -> list[DemoRow]:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, NF4Tensor, quantize_

    rows = []
    nf4 = NF4Tensor.from_tensor(w, 64, 256)
    ours, ms = _timed(lambda: torch_side.dequantize_weight(nf4))
    rows.append(_row("NF4Tensor", "torchao", ours, nf4.get_original_weight(), w, ms))
    for label, config in (("Int8Tensor", Int8WeightOnlyConfig()), ("Float8Tensor", Float8WeightOnlyConfig())):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        quantize_(lin, config)
        q = lin.weight
        ours, ms = _timed(lambda q=q: torch_side.dequantize_weight(q))
        rows.append(_row(label, "torchao", ours, q.dequantize(), w, ms))
        if label == "Float8Tensor":  # the same bytes through the FP8 path
            ours, ms = _timed(lambda q=q: torch_side.dequantize_fp8(q.qdata, q.scale, w.dtype))
            rows.append(_row("FP8 per-row", "torchao", ours, q.dequantize(), w, ms))
    return rows


def run_demo(rows: int = 512, cols: int = 1024, *, seed: int = 0, device: str | None = None) -> list[DemoRow]:
    """Quantizes one random bf16 ``[rows, cols]`` weight with bitsandbytes and torchao and dequantizes each
    result with torch_side. Returns one :class:`DemoRow` per format."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16).to(dev)
    return _bnb_rows(w) + _torchao_rows(w)


def format_report(report: list[DemoRow]) -> str:
    head = f"{'format':<14}{'producer':<14}{'equal values':>14}{'max |diff|':>12}{'rel err vs fp':>15}{'ms':>9}"
    lines = [head, "-" * len(head)]
    for r in report:
        lines.append(
            f"{r.fmt:<14}{r.producer:<14}{'yes' if r.bit_identical else 'NO':>14}"
            f"{r.max_abs_vs_producer:>12.3g}{r.rel_err_vs_original:>15.4f}{r.ms:>9.2f}"
        )
    return "\n".join(lines)
