"""kvrun's Triton kernels and the TRITON_ATTN attention backend (CUDA and ROCm).

- :func:`kvrun_cuda.triton.ops.triton_ops`: op name -> kernel, for Platform.ops().
- :class:`kvrun_cuda.triton.attention.TritonAttention`: the attention backend, and
  ``TritonFp8Attention``, the same over an fp8 KV cache with measured scales.
- :mod:`kvrun_cuda.triton.aot`: compile every kernel for a GPU target without a GPU.

Importing this package imports nothing heavy; the submodules import triton.
"""

__all__: list[str] = []
