"""qbridge: quantized PyTorch weights into JAX, dequantized on the GPU and handed over zero-copy.

The only package that imports both torch and jax. The dequantization itself lives in ``torch_side``
(torch only); Flax layout rules and JAX-native dequantization live in ``jax_side`` (jax only).
"""

from qbridge._errors import CheckpointError
from qbridge._errors import FormatError
from qbridge._errors import QBridgeError
from torch_side import dequantize
from torch_side import dequantize_fp8
from torch_side import dequantize_weight
from torch_side import is_quant_tensor_subclass

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FormatError",
    "QBridgeError",
    "dequantize",
    "dequantize_fp8",
    "dequantize_weight",
    "is_quant_tensor_subclass",
]
