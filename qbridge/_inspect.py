"""``inspect_checkpoint``: what a checkpoint holds, read from headers only."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any

from ._checkpoint import open_checkpoint


@dataclasses.dataclass
class CheckpointSummary:
    """A checkpoint at a glance.

    Attributes:
        path, format: where and what (``bitsandbytes-4bit``, ``fp8``, ``torchao``, ``safetensors`` ...).
        quantization_config: ``config.json``'s ``quantization_config`` (empty if none).
        kinds: ``kind -> {"tensors", "stored_bytes", "dense_bytes"}`` (``dense``, ``bnb4``, ``bnb8``, ``fp8``,
            ``torchao``).
        stored_bytes: bytes the weights take in the checkpoint; dense_bytes: after dequantization.
        skipped: tensors that are not weights (buffers, activation scales).
        care: weights whose shapes need care (partial FP8 tiles, 4-bit weights whose rows are not whole
            blocks), one line each.
    """

    path: str
    format: str
    files: int
    quantization_config: dict[str, Any]
    kinds: dict[str, dict[str, int]]
    stored_bytes: int
    dense_bytes: int
    skipped: list[str]
    care: list[str]

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.format}, {self.files} file(s)"]
        if self.quantization_config:
            lines.append("quantization_config: " + ", ".join(f"{k}={v}" for k, v in sorted(self.quantization_config.items())))
        lines.append(f"{'kind':<10}{'tensors':>9}{'stored MB':>12}{'dequantized MB':>16}")
        for kind, k in sorted(self.kinds.items()):
            lines.append(f"{kind:<10}{k['tensors']:>9}{k['stored_bytes'] / 1e6:>12.2f}{k['dense_bytes'] / 1e6:>16.2f}")
        lines.append(f"{'total':<10}{sum(k['tensors'] for k in self.kinds.values()):>9}"
                     f"{self.stored_bytes / 1e6:>12.2f}{self.dense_bytes / 1e6:>16.2f}")  # fmt: skip
        if self.skipped:
            lines.append("not weights (skipped when loading): " + ", ".join(self.skipped))
        if self.care:
            lines.append("shapes that need care:")
            lines += [f"  {c}" for c in self.care]
        return "\n".join(lines)


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointSummary:
    """Summarizes a checkpoint without reading its weights (see :class:`CheckpointSummary`).

    Raises:
        CheckpointError / FormatError: as :func:`qbridge.load_checkpoint` would for the same files.
    """
    with open_checkpoint(path) as ckpt:
        kinds: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"tensors": 0, "stored_bytes": 0, "dense_bytes": 0})
        care = []
        for e in ckpt.entries.values():
            k = kinds[e.kind]
            k["tensors"] += 1
            k["stored_bytes"] += e.stored_bytes
            k["dense_bytes"] += e.dense_bytes
            if e.kind == "fp8" and e.info.get("partial"):
                layout = e.info["layout"]
                care.append(f"{e.name}: {list(e.shape)} with {layout.block[0]}x{layout.block[1]} blocks "
                            f"-> scales {list(layout.grid)}, last tiles partial")  # fmt: skip
            if e.kind == "bnb4":
                bs = int(e.info["quant_state"]["blocksize"])
                if e.shape and e.shape[-1] % bs:
                    care.append(f"{e.name}: {list(e.shape)}, rows are not whole {bs}-element blocks "
                                "(bitsandbytes' CPU kernel is wrong here; qbridge is not)")  # fmt: skip
        return CheckpointSummary(
            path=os.fspath(path),
            format=ckpt.format,
            files=len(set(ckpt.source.key_file.values())),
            quantization_config=ckpt.quantization_config,
            kinds=dict(kinds),
            stored_bytes=sum(e.stored_bytes for e in ckpt.entries.values()),
            dense_bytes=sum(math.prod(e.shape) * e.dtype.itemsize for e in ckpt.entries.values()),
            skipped=list(ckpt.skipped),
            care=care,
        )
