"""Parity between a torch computation and a JAX/Flax one: per-output errors, cosine similarity, and an
``assert_parity`` for tests.

Default tolerances depend on the lower precision of the two outputs: an output passes when its largest
absolute error is at most ``rtol * max|reference|`` and its cosine similarity with the reference is at
least ``min_cosine``:

| dtype            | rtol   | min_cosine |
| ---------------- | ------ | ---------- |
| float64          | 1e-10  | 1 - 1e-12  |
| float32          | 1e-4   | 1 - 1e-6   |
| float16          | 1e-2   | 1 - 1e-4   |
| bfloat16, float8 | 6e-2   | 0.999      |

(bfloat16 keeps 8 significant bits; a few layers of bf16 matmuls with different accumulation orders move
logits by a few percent of their range.) Complex outputs take their parts' tolerances, on complex
differences. Integer and boolean outputs (token ids, masks) must be equal, compared as integers. The
errors and the cosine are taken over the elements finite on both sides: the same infinity on both sides
(masked logits) agrees, while a NaN, or an infinity on one side only, fails the output (``max_abs`` inf).
A masked position (an infinity, or the largest finite magnitude of either side's dtype:
``torch.finfo(dtype).min``, its lowest value, which transformers fills masked positions with) on both
sides, with one sign, agrees too, whichever of these each side holds, and masked positions are left out of
the errors' scale and the cosine. Other mask values (``-1e9``, ``-1e4``) are compared as values: they set
the errors' scale.
"""

from ._compare import (
    TOLERANCES,
    OutputParity,
    ParityReport,
    assert_parity,
    compare,
    run_parity,
)
from ._env import name_public_classes
from ._trace import (
    TracePair,
    TraceReport,
    trace,
    trace_checkpoint,
)

__all__ = [
    "TOLERANCES",
    "OutputParity",
    "ParityReport",
    "TracePair",
    "TraceReport",
    "assert_parity",
    "compare",
    "run_parity",
    "trace",
    "trace_checkpoint",
]

name_public_classes(globals())
