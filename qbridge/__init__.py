"""qbridge: quantized PyTorch weights into JAX, dequantized on the GPU and handed over zero-copy.

The only package that imports both torch and jax. The dequantization itself lives in ``torch_side``
(torch only); Flax layout rules and JAX-native dequantization live in ``jax_side`` (jax only).
"""

from qbridge._env import configure_jax_memory

configure_jax_memory()  # before JAX starts its GPU backend: torch and JAX share the card

from qbridge._errors import CheckpointError  # noqa: E402
from qbridge._errors import FormatError  # noqa: E402
from qbridge._errors import QBridgeError  # noqa: E402
from qbridge._bench import run_bench as bench  # noqa: E402
from qbridge._checkpoint import open_checkpoint  # noqa: E402
from qbridge._convert import convert_checkpoint  # noqa: E402
from qbridge._convert import restore_converted  # noqa: E402
from qbridge._handoff import dequantize_to_jax  # noqa: E402
from qbridge._handoff import is_compact  # noqa: E402
from qbridge._handoff import to_jax  # noqa: E402
from qbridge._handoff import to_torch  # noqa: E402
from qbridge._inspect import CheckpointSummary  # noqa: E402
from qbridge._inspect import inspect_checkpoint  # noqa: E402
from qbridge._targets import build_target  # noqa: E402
from qbridge._loader import LoadReport  # noqa: E402
from qbridge._loader import dequantized_state  # noqa: E402
from qbridge._loader import load_checkpoint  # noqa: E402
from qbridge._peft import load_peft_adapter  # noqa: E402
from qbridge._peft import save_peft_adapter  # noqa: E402
from torch_side import dequantize  # noqa: E402
from torch_side import dequantize_fp8  # noqa: E402
from torch_side import dequantize_weight  # noqa: E402
from torch_side import is_quant_tensor_subclass  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointSummary",
    "FormatError",
    "LoadReport",
    "QBridgeError",
    "bench",
    "build_target",
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
    "restore_converted",
    "save_peft_adapter",
    "to_jax",
    "to_torch",
]
