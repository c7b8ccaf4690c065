"""Custom kernels (Triton) with plain-PyTorch references of the same signature."""

from .mla_decode import (HAS_TRITON, mla_decode, mla_decode_bytes, mla_decode_num_splits, mla_decode_reference,
                         mla_decode_triton)

__all__ = ["HAS_TRITON", "mla_decode", "mla_decode_bytes", "mla_decode_num_splits", "mla_decode_reference",
           "mla_decode_triton"]
