"""qbridge: quantized PyTorch weights into JAX, dequantized on the GPU and handed over zero-copy.

The only package that imports both torch and jax. The dequantization itself lives in ``torch_side``
(torch only); Flax layout rules and JAX-native dequantization live in ``jax_side`` (jax only).
"""

from qbridge._env import configure_jax_memory, name_public_classes

configure_jax_memory()  # before JAX starts its GPU backend: torch and JAX share the card

from qbridge import parity  # qbridge.parity.compare / trace work after a plain `import qbridge`
from qbridge._bench import run_bench as bench
from qbridge._checkpoint import Checkpoint, open_checkpoint
from qbridge._convert import (
    convert_checkpoint,
    restore_converted,
)
from qbridge._errors import (
    CheckpointError,
    FormatError,
    QBridgeError,
)
from qbridge._handoff import (
    dequantize_to_jax,
    is_compact,
    to_jax,
    to_jax_many,
    to_torch,
)
from qbridge._inspect import (
    CheckpointSummary,
    inspect_checkpoint,
)
from qbridge._loader import (
    LoadReport,
    dequantized_state,
    load_checkpoint,
)
from qbridge._multiprocess import (
    ProcessReport,
    check_multiprocess_load,
)
from qbridge._peft import (
    load_peft_adapter,
    save_peft_adapter,
)
from qbridge._targets import build_target
from torch_side import (
    dequantize,
    dequantize_fp8,
    dequantize_weight,
    is_quant_tensor_subclass,
)

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointSummary",
    "FormatError",
    "LoadReport",
    "ProcessReport",
    "QBridgeError",
    "bench",
    "build_target",
    "check_multiprocess_load",
    "configure_jax_memory",
    "convert_checkpoint",
    "dequantize",
    "dequantize_fp8",
    "dequantize_to_jax",
    "dequantize_weight",
    "dequantized_state",
    "inspect_checkpoint",
    "is_compact",
    "is_quant_tensor_subclass",
    "load_checkpoint",
    "load_peft_adapter",
    "open_checkpoint",
    "parity",
    "restore_converted",
    "save_peft_adapter",
    "to_jax",
    "to_jax_many",
    "to_torch",
]

name_public_classes(globals())
