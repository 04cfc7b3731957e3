"""Output parity: per-output errors and cosine similarity with dtype-aware tolerances (public face:
``qbridge.parity``, whose docstring gives the tolerances)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

TOLERANCES = {
    "float64": (1e-10, 1 - 1e-12),
    "float32": (1e-4, 1 - 1e-6),
    "float16": (1e-2, 1 - 1e-4),
    "bfloat16": (6e-2, 0.999),
    "float8": (6e-2, 0.999),
}
_ORDER = ["float8", "bfloat16", "float16", "float32", "float64"]


@dataclasses.dataclass
class OutputParity:
    """How one output of the candidate compares with the reference."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_rel: float  # max_abs / max|reference|
    cosine: float
    rtol: float
    min_cosine: float
    ok: bool


@dataclasses.dataclass
class ParityReport:
    """Per-output parity; ``ok`` when every output passes."""

    outputs: list[OutputParity]

    @property
    def ok(self) -> bool:
        """True when every output agrees within its tolerance."""
        return all(o.ok for o in self.outputs)

    def __str__(self) -> str:
        head = f"{'output':<24}{'shape':<18}{'dtype':<10}{'max |err|':>11}{'rel':>10}{'cosine':>12}  verdict"
        lines = [head, "-" * len(head)]
        for o in self.outputs:
            shape = "x".join(map(str, o.shape))
            lines.append(
                f"{o.name:<24}{shape:<18}{o.dtype:<10}{o.max_abs:>11.3g}{o.max_rel:>10.2e}{o.cosine:>12.7f}  "
                + (
                    "ok"
                    if o.ok
                    else f"FAIL (rel <= {o.rtol:g}, cosine >= {o.min_cosine:g} for {o.dtype}; pass rtol=/min_cosine= for others)"
                )
            )
        return "\n".join(lines)


def _kind(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    if "float8" in name:
        return "float8"
    if name.startswith("complex"):  # the tolerances of its parts
        return {"complex32": "float16", "chalf": "float16", "complex64": "float32"}.get(name, "float64")
    if name in TOLERANCES:
        return name
    if name == "bool" or "int" in name:  # token ids, masks: compared exactly
        return name
    return "float32"


def _tolerances(kind: str) -> tuple[float, float]:
    """``(rtol, min_cosine)`` for an output kind: integers and booleans must be equal."""
    return TOLERANCES.get(kind, (0.0, 0.0))


def _mask_values(*dtypes: str) -> list[float]:
    """The largest finite magnitudes of the floating dtypes named (``"bfloat16"``, ``"torch.float16"`` ...):
    the values transformers fills masked positions with (``torch.finfo(dtype).min``), as float64."""
    largest = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38,
               "float64": 1.7976931348623157e308}  # fmt: skip
    return sorted({largest[n] for d in dtypes if (n := str(d).replace("torch.", "")) in largest})


def _numpy(x: Any) -> tuple[np.ndarray, str]:
    """Values as numpy (float64, complex128 for complex values, integers and booleans as they are), and the
    source dtype's name."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            name = str(x.dtype).replace("torch.", "")
            t = x.detach().cpu()
            if t.is_complex():
                return t.to(torch.complex128).numpy(), name
            if t.is_floating_point():
                return t.to(torch.float64).numpy(), name
            return t.numpy(), name
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.complexfloating):
        return arr.astype(np.complex128), str(arr.dtype)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return arr, str(arr.dtype)
    return arr.astype(np.float64), str(arr.dtype)


def _flatten(tree: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    if hasattr(tree, "logits") and not hasattr(tree, "shape"):  # transformers model outputs (dicts too)
        return [(prefix if prefix != "output" else "logits", tree.logits)]
    if isinstance(tree, dict):
        return [
            item
            for k in sorted(tree)
            for item in _flatten(tree[k], f"{prefix}.{k}" if prefix != "output" else str(k))
        ]
    if isinstance(tree, (list, tuple)):
        return [item for i, v in enumerate(tree) for item in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, tree)]


def compare(
    reference: Any,
    candidate: Any,
    *,
    rtol: float | None = None,
    min_cosine: float | None = None,
) -> ParityReport:
    """Compares two outputs (arrays, torch tensors, or matching dicts/lists of them; transformers model
    outputs give their ``logits``).

    Args:
        reference: usually the torch model's output.
        candidate: usually the Flax model's output.
        rtol: allowed ``max|err| / max|reference|``; default from the lower-precision dtype (module docstring).
        min_cosine: required cosine similarity; default likewise.

    Raises:
        ValueError: the two have different structures or shapes.
    """
    refs, cands = _flatten(reference), _flatten(candidate)
    named = [
        isinstance(t, dict) or (hasattr(t, "logits") and not hasattr(t, "shape"))
        for t in (reference, candidate)
    ]
    if len(refs) == len(cands) == 1 and not all(named):
        # one output each, one of them unnamed (an array, or a one-element tuple such as a model's output with
        # return_dict=False): paired with the other; two named outputs (dicts, model outputs) must have the
        # same name
        cands = [(refs[0][0], cands[0][1])]
    if [n for n, _ in refs] != [n for n, _ in cands]:
        raise ValueError(f"outputs differ in structure: {[n for n, _ in refs]} vs {[n for n, _ in cands]}")
    outputs = []
    for (name, r), (_, c) in zip(refs, cands):
        ref, ref_dtype = _numpy(r)
        cand, cand_dtype = _numpy(c)
        if ref.shape != cand.shape:
            raise ValueError(f"output {name!r}: shapes {ref.shape} and {cand.shape} differ")
        outputs.append(_output_parity(name, ref, ref_dtype, cand, cand_dtype, rtol, min_cosine))
    return ParityReport(outputs)


def _output_parity(
    name: str,
    ref: np.ndarray,
    ref_dtype: str,
    cand: np.ndarray,
    cand_dtype: str,
    rtol: float | None,
    min_cosine: float | None,
) -> OutputParity:
    """One output's parity: ``ref`` and ``cand`` (one shape; float64, complex128, integers or booleans, as
    :func:`_numpy` gives them, or floats widened exactly) and the names of the dtypes they came from, which
    pick the tolerances and the mask values."""
    kinds = [_kind(ref_dtype), _kind(cand_dtype)]
    floating = [k for k in kinds if k in _ORDER]  # an integer output beside a float one: the float's
    kind = min(floating, key=_ORDER.index) if floating else kinds[0]
    default_rtol, default_cos = _tolerances(kind)
    tol, cos_min = (
        rtol if rtol is not None else default_rtol,
        min_cosine if min_cosine is not None else default_cos,
    )
    # the same infinity on both sides (masked logits) agrees; NaN, or an infinity on one side only, fails. A
    # masked position may hold, instead of an infinity, the largest finite magnitude of either side's dtype
    # (transformers masks with finfo.min; a bfloat16 output's may reach the other side widened to float32):
    # masked on both sides, with one sign, it agrees too. Masked positions are left out of the errors' scale
    # and the cosine, which they would swamp
    both = np.isfinite(ref) & np.isfinite(cand)
    same = ref == cand
    if ref.dtype.kind == "f" and cand.dtype.kind == "f":
        extremes = _mask_values(ref_dtype, cand_dtype)
        masked = _masked(ref, extremes) & _masked(cand, extremes) & (np.signbit(ref) == np.signbit(cand))
        both &= ~masked
        same |= masked
    agree_elsewhere = bool((same | both).all())
    ref_f, cand_f = ref[both], cand[both]
    if kind not in _ORDER:  # integers and booleans: exact, in their own arithmetic (no float64 rounding)
        diffs = [
            abs(int(r) - int(c)) for r, c in zip(ref_f.ravel().tolist(), cand_f.ravel().tolist()) if r != c
        ]
        max_abs = float(max(diffs, default=0))
        ref_f, cand_f = ref_f.astype(np.float64), cand_f.astype(np.float64)
    else:
        err = np.abs(ref_f - cand_f)  # a complex difference's modulus
        max_abs = float(err.max()) if err.size else 0.0
    if not agree_elsewhere:
        max_abs = float("inf")
    scale = float(np.abs(ref_f).max()) if ref_f.size else 0.0
    max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
    denom = float(np.linalg.norm(ref_f) * np.linalg.norm(cand_f))
    cosine = float(np.real(np.vdot(ref_f, cand_f)) / denom) if denom else float(max_abs == 0)
    ok = agree_elsewhere and max_rel <= tol and cosine >= cos_min
    return OutputParity(name, tuple(ref.shape), kind, max_abs, max_rel, cosine, tol, cos_min, ok)


def _masked(x: np.ndarray, extremes: list[float]) -> np.ndarray:
    """Where ``x`` holds an infinity or one of ``extremes`` (either sign): a masked position."""
    magnitude = np.abs(x)
    return np.isinf(magnitude) | np.isin(magnitude, extremes)


def run_parity(
    torch_fn: Callable[..., Any],
    jax_fn: Callable[..., Any],
    inputs: Sequence[Any],
    **tolerances: Any,
) -> ParityReport:
    """Runs ``torch_fn(*inputs)`` (under ``torch.no_grad``, inputs as torch tensors) and ``jax_fn(*inputs)``
    (inputs as numpy/JAX arrays) and compares their outputs with :func:`compare`."""
    import torch

    torch_inputs = [torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in inputs]
    jax_inputs = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.no_grad():
        reference = torch_fn(*torch_inputs)
    return compare(reference, jax_fn(*jax_inputs), **tolerances)


def assert_parity(reference: Any, candidate: Any, **tolerances: Any) -> ParityReport:
    """:func:`compare`, raising AssertionError with the full report when any output fails."""
    report = compare(reference, candidate, **tolerances)
    if not report.ok:
        raise AssertionError(f"parity failed:\n{report}")
    return report
