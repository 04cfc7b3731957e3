"""torch_side: dequantize PyTorch-quantized weights with torch (never imports jax).

bitsandbytes NF4/FP4, block-FP8 and torchao tensor subclasses in, dense torch tensors out, bit for bit
what the producing library computes.
"""

from torch_side._backend import BACKENDS
from torch_side._codes import FP4_CODE, NF4_CODE, standard_code
from torch_side._compile import wait_for_kernels
from torch_side._fp8 import (
    ScaleLayout,
    dequantize_fp8,
    dequantize_fp8_many,
    dequantize_fp8_reference,
    fp8_scale_layout,
)
from torch_side._int8 import dequantize_int8
from torch_side._nf4 import (
    decode_nested_absmax_reference,
    dequantize,
    dequantize_4bit_reference,
    dequantize_many,
    dequantize_nf4,
)
from torch_side._quant_state import FourBitState, parse_quant_state
from torch_side._weight import dequantize_weight, is_quant_tensor_subclass

__all__ = [
    "BACKENDS",
    "FP4_CODE",
    "NF4_CODE",
    "FourBitState",
    "ScaleLayout",
    "decode_nested_absmax_reference",
    "dequantize",
    "dequantize_4bit_reference",
    "dequantize_fp8",
    "dequantize_fp8_many",
    "dequantize_fp8_reference",
    "dequantize_int8",
    "dequantize_many",
    "dequantize_nf4",
    "dequantize_weight",
    "fp8_scale_layout",
    "is_quant_tensor_subclass",
    "parse_quant_state",
    "standard_code",
    "wait_for_kernels",
]

# Public classes name the package they are used from (in reprs, tracebacks and the API reference).
for _name in __all__:
    _obj = globals().get(_name)
    if isinstance(_obj, type) and _obj.__module__.startswith(__name__ + "._"):
        _obj.__module__ = __name__
del _name, _obj
