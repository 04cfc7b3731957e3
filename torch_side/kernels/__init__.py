"""Triton kernels (``@triton.jit`` functions only). Their wrappers, which check inputs and launch, are in
``torch_side._triton``; their oracles are the plain-torch functions in ``torch_side._nf4`` and ``_fp8``."""
