"""Custom kernels (Triton) with plain-PyTorch references of the same signature."""

from .fp8_weight_gemm import (fp8_grouped_linear, fp8_grouped_linear_reference, fp8_grouped_linear_triton,
                              fp8_linear, fp8_linear_reference, fp8_linear_triton)
from .mla_decode import (HAS_TRITON, mla_decode, mla_decode_bytes, mla_decode_num_splits, mla_decode_reference,
                         mla_decode_triton)

__all__ = ["HAS_TRITON", "fp8_grouped_linear", "fp8_grouped_linear_reference", "fp8_grouped_linear_triton",
           "fp8_linear", "fp8_linear_reference", "fp8_linear_triton", "mla_decode", "mla_decode_bytes",
           "mla_decode_num_splits", "mla_decode_reference", "mla_decode_triton"]
