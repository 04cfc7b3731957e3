"""``inspect_checkpoint``: what a checkpoint holds, read from headers only."""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any

from ._checkpoint import open_checkpoint
from ._decode import check_scales, check_torchao_scales, torchao_weight

SHOWN = 8  # lines of one kind a summary shows before it counts the rest


@dataclasses.dataclass
class CheckpointSummary:
    """A checkpoint at a glance.

    Attributes:
        path: the checkpoint directory or file.
        files: how many weight files it has.
        format: ``bitsandbytes-4bit``, ``bitsandbytes-8bit``, ``fp8``, ``torchao`` or ``safetensors``.
        quantization_config: ``config.json``'s ``quantization_config`` (empty if none).
        kinds: ``kind -> {"tensors", "stored_bytes", "dense_bytes"}`` (``dense``, ``bnb4``, ``bnb8``, ``fp8``,
            ``torchao``).
        stored_bytes: bytes the weights take in the checkpoint.
        dense_bytes: bytes they take after dequantization.
        skipped: tensors that are no parameters (tied copies, buffers, activation scales), skipped when
            loading unless a target asks for them.
        care: weights whose shapes need care (partial FP8 tiles, 4-bit weights whose rows are not whole
            blocks), one line each.
        skip_reasons: ``key -> why`` for each skipped tensor.
        classified_by: where the module kinds came from (the torch model built on the meta device, or
            name rules).
        guessed: the tensors whose module kind name rules decided.
        decoded_to: ``kind -> dtype names`` the quantized weights of each kind decode to (a 4-bit weight:
            its quant state's dtype; FP8 and 8-bit: ``config.json``'s ``dtype`` (or ``torch_dtype``), bfloat16 when absent,
            as transformers decodes them; torchao: the tensor subclass's own dtype, what its ``dequantize()``
            returns). ``load_checkpoint``'s ``dtype`` casts after that decode.
        config_mismatches: how the tensors differ from the torch model of ``config.json`` (built on the meta
            device), one line each (``"missing: <key> ..."``, ``"other size: <key>: ..."``): what makes
            ``load_checkpoint`` without a target refuse the checkpoint (with ``strict=False``: warn). Empty
            where they agree or the model was not built.
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
    skip_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    classified_by: str = ""
    guessed: list[str] = dataclasses.field(default_factory=list)
    decoded_to: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    config_mismatches: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.format}, {self.files} file(s)"]
        if self.quantization_config:
            lines.append(
                "quantization_config: "
                + ", ".join(f"{k}={v}" for k, v in sorted(self.quantization_config.items()))
            )
        lines.append(f"{'kind':<10}{'tensors':>9}{'stored MB':>12}{'dequantized MB':>16}")
        for kind, k in sorted(self.kinds.items()):
            lines.append(
                f"{kind:<10}{k['tensors']:>9}{k['stored_bytes'] / 1e6:>12.2f}{k['dense_bytes'] / 1e6:>16.2f}"
            )
        lines.append(f"{'total':<10}{sum(k['tensors'] for k in self.kinds.values()):>9}"
                     f"{self.stored_bytes / 1e6:>12.2f}{self.dense_bytes / 1e6:>16.2f}")  # fmt: skip
        if self.decoded_to:
            lines.append(
                "decoded to: "
                + "; ".join(f"{kind} {', '.join(names)}" for kind, names in sorted(self.decoded_to.items()))
                + " (a dtype= given to load_checkpoint casts after that decode)"
            )
        lines.append(f"classified by: {self.classified_by}")
        if self.config_mismatches:
            lines.append(
                "does not fit the model of its config.json (load_checkpoint without a target refuses it):"
            )
            lines += [f"  {m}" for m in self.config_mismatches[:SHOWN]]
            if len(self.config_mismatches) > SHOWN:
                lines.append(
                    f"  ... {len(self.config_mismatches)} in all (CheckpointSummary.config_mismatches)"
                )
        if self.guessed:
            shown = ", ".join(self.guessed[:SHOWN]) + (
                f", ... ({len(self.guessed)} in all)" if len(self.guessed) > SHOWN else ""
            )
            lines.append(f"module kinds guessed from names: {shown}")
        if self.skipped:
            lines.append("no parameters (skipped when loading unless a target asks):")
            by_reason: dict[str, list[str]] = collections.defaultdict(list)
            for key in self.skipped:
                by_reason[self.skip_reasons.get(key, "")].append(key)
            for reason, keys in by_reason.items():
                if len(keys) <= SHOWN:
                    lines += [f"  {key}: {reason}" for key in keys]
                else:  # one line for many tensors of one kind (a tag on every 8-bit weight)
                    lines.append(f"  {len(keys)} tensors, {reason}: {', '.join(keys[:2])}, ... {keys[-1]}")
        if self.care:
            lines.append("shapes that need care:")
            lines += [f"  {c}" for c in self.care[:SHOWN]]
            if len(self.care) > SHOWN:
                lines.append(f"  ... {len(self.care)} in all (CheckpointSummary.care lists every one)")
        return "\n".join(lines)


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointSummary:
    """Summarizes a checkpoint without reading its weights (see :class:`CheckpointSummary`): from the headers,
    the quant states and the scales (absmax, ``scale_inv``, ``SCB``, a torchao weight's scales and zero
    points), which are read and checked.

    Raises:
        CheckpointError: as :func:`qbridge.load_checkpoint` would for the same files, damaged (NaN/Inf)
            scales included.
        FormatError: an unknown or mixed quantization format.
    """
    with open_checkpoint(path) as ckpt:
        ckpt.refuse_unreadable()
        classification = ckpt.classify(ask_model=True)
        unfit = ckpt.config_mismatches()
        for e in ckpt.entries.values():
            for role in ("absmax", "nested_absmax", "scale", "scb"):
                if role in e.keys:
                    check_scales(ckpt, e.keys[role], ckpt.read(e.keys[role]))
            if e.kind == "torchao":  # over the file's map: only the scales and zero points are read
                check_torchao_scales(ckpt, e, torchao_weight(ckpt, e, mapped=True))
        kinds: dict[str, dict[str, int]] = collections.defaultdict(
            lambda: {"tensors": 0, "stored_bytes": 0, "dense_bytes": 0}
        )
        care = []
        decoded: dict[str, set[str]] = collections.defaultdict(set)
        for e in ckpt.entries.values():
            if e.name in classification.optional:
                continue
            if e.kind in ("bnb4", "bnb8", "fp8", "torchao"):
                decoded[e.kind].add(str(e.dtype).removeprefix("torch."))
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
                                "(bitsandbytes' native CPU kernel can be wrong here on AVX-512 CPUs; "
                                "qbridge is not)")  # fmt: skip
        return CheckpointSummary(
            path=os.fspath(path),
            format=ckpt.format,
            files=len(set(ckpt.source.key_file.values())),
            quantization_config=ckpt.quantization_config,
            kinds=dict(kinds),
            stored_bytes=sum(k["stored_bytes"] for k in kinds.values()),
            dense_bytes=sum(k["dense_bytes"] for k in kinds.values()),
            skipped=sorted(classification.optional),
            care=care,
            skip_reasons=dict(classification.optional),
            classified_by=classification.source,
            guessed=list(classification.guessed),
            decoded_to={kind: sorted(names) for kind, names in decoded.items()},
            config_mismatches=unfit.lines() if unfit is not None else [],
        )
