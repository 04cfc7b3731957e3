"""torch_side: dequantize PyTorch-quantized weights with torch (never imports jax).

bitsandbytes NF4/FP4, block-FP8 and torchao tensor subclasses in, dense torch tensors out, bit for bit
what the producing library computes.
"""

from torch_side._backend import BACKENDS
from torch_side._codes import FP4_CODE
from torch_side._codes import NF4_CODE
from torch_side._codes import standard_code
from torch_side._fp8 import ScaleLayout
from torch_side._fp8 import dequantize_fp8
from torch_side._fp8 import dequantize_fp8_reference
from torch_side._fp8 import fp8_scale_layout
from torch_side._int8 import dequantize_int8
from torch_side._nf4 import decode_nested_absmax_reference
from torch_side._nf4 import dequantize
from torch_side._nf4 import dequantize_4bit_reference
from torch_side._nf4 import dequantize_nf4
from torch_side._quant_state import FourBitState
from torch_side._quant_state import parse_quant_state
from torch_side._weight import dequantize_weight
from torch_side._weight import is_quant_tensor_subclass

__all__ = [
    "BACKENDS",
    "FP4_CODE",
    "FourBitState",
    "NF4_CODE",
    "ScaleLayout",
    "decode_nested_absmax_reference",
    "dequantize",
    "dequantize_4bit_reference",
    "dequantize_fp8",
    "dequantize_fp8_reference",
    "dequantize_int8",
    "dequantize_nf4",
    "dequantize_weight",
    "fp8_scale_layout",
    "is_quant_tensor_subclass",
    "parse_quant_state",
    "standard_code",
]
